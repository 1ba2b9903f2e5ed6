"""The command line: the README command, reports, and one-line errors with exit code 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from se_retrofit.cli import main

from helpers import user_attention_source


def cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _offline_env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}


def test_readme_command_works_offline(tmp_path):
    script = Path(sys.executable).with_name("se-retrofit")
    result = subprocess.run([str(script), "resnet50", "--position", "post", "--r", "16"], cwd=tmp_path,
                            env=_offline_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "offline" in result.stderr and "RANDOM weights" in result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert "blocks found: 16 (stages 1,2,3,4); edited: 16" in out
    assert "parameters: 25,557,032 → 28,088,024 (+9.90%)" in out
    assert "identity check: max |Δ| = 0 (relative 0)" in out
    saved = tmp_path / "resnet50-se-post-r16"
    config = json.loads((saved / "retrofit_config.json").read_text())
    assert config["base"]["weights"].startswith("random initialisation (pretrained weights unavailable offline")
    assert (saved / "model.safetensors").stat().st_size > 100_000_000


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "se_retrofit", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--position {standard,pre,post,identity,inner,stage}" in result.stdout


def test_json_report(capsys, tmp_path):
    code, out, err = cli(capsys, "resnet18", "--weights", "none", "--input-size", "3,64,64", "--json",
                         "--out", str(tmp_path / "o"))
    assert code == 0, err
    report = json.loads(out)
    assert report["blocks_found"] == 8 and len(report["sites"]) == 8
    assert report["identity_max_abs_diff"] == 0.0 and report["dry_run"] is False
    assert report["sites"][0] == {"block": "layer1.0", "unit": "layer1.0", "kind": "residual",
                                  "module": "layer1.0.se", "stage": 1, "channels": 64,
                                  "reduced": 8, "params": 1096, "attention_map_bytes": None}
    assert report["output_dir"] == str(tmp_path / "o") and (tmp_path / "o" / "model.safetensors").is_file()


def test_dry_run_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "torchvision:resnet50", "--weights", "none", "--stages", "3,4", "--dry-run",
                         "--input-size", "3,64,64")
    assert code == 0, err
    assert "layer3.0" in out and "layer1.0" not in out and "dry run: nothing written" in out
    assert list(tmp_path.iterdir()) == []


def test_stacking_warning_is_printed(capsys, tmp_path):
    code, out, err = cli(capsys, "efficientnet_b0", "--weights", "none", "--input-size", "3,64,64",
                         "--dry-run")
    assert code == 0 and "9 blocks already have channel attention" in out


def test_local_weights_file(capsys, tmp_path):
    weights = tmp_path / "r18.safetensors"
    model = timm.create_model("resnet18")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    code, out, err = cli(capsys, "resnet18", "--weights", str(weights), "--input-size", "3,64,64",
                         "--out", str(tmp_path / "o"), "--json")
    assert code == 0, err
    assert json.loads(out)["weights"] == f"file {weights}"


def _broken(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"\x00garbage")
    return path


def _mismatched(tmp_path):
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}, str(path))
    return path


ERRORS = [
    (["resnet5O"], "unknown model 'resnet5O' in timm or torchvision; did you mean resnet50"),
    (["resnet18", "--r", "0"], "argument --r: must be a positive integer up to 4096, got '0'"),
    (["resnet18", "--r", "abc"], "argument --r: must be a positive integer up to 4096, got 'abc'"),
    (["resnet18", "--weights", "none", "--stages", "7"], "stage(s) 7 out of range: this model's residual "
                                                         "blocks are in stages 1-4"),
    (["resnet18", "--position", "middle"], "argument --position: invalid choice: 'middle'"),
    (["resnet18", "--weights", "none", "--kinds", "chain"], "no units of kind chain found: 8 of its 8 additions "
                                                            "are residual connections"),
    (["resnet18", "--kinds", "dense"], "argument --kinds: unknown unit kind dense; choose from residual, join, chain"),
    (["resnet18", "--weights", "missing.safetensors"], "weights file missing.safetensors does not exist"),
    (["resnet18", "--weights", "{broken}"], "pickled torch files are read only when you allow it (--allow-pickle"),
    (["resnet18", "--weights", "{broken}", "--allow-pickle"], "cannot read weights file"),
    (["resnet50", "--weights", "{mismatched}"], "do not match the model: missing"),
    (["resnet18", "--attention", "cbamx"], "unknown attention type 'cbamx'"),
]


@pytest.mark.parametrize("args,message", ERRORS, ids=[" ".join(a) for a, _ in ERRORS])
def test_errors_are_one_line_with_exit_code_2(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    files = {"{broken}": str(_broken(tmp_path)), "{mismatched}": str(_mismatched(tmp_path))}
    before = set(tmp_path.iterdir())
    code, out, err = cli(capsys, *[files.get(a, a) for a in args], "--input-size", "3,64,64")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("se-retrofit: error: "), err
    assert message in lines[0]
    assert "Traceback" not in err and out == ""
    assert set(tmp_path.iterdir()) == before  # nothing written


def test_existing_output_directory_is_refused_before_any_work(capsys, tmp_path):
    (tmp_path / "o").mkdir()
    code, out, err = cli(capsys, "resnet18", "--weights", "none", "--out", str(tmp_path / "o"))
    assert code == 2 and "already exists; pass --overwrite" in err


def test_errors_from_the_installed_script_have_no_traceback(tmp_path):
    script = Path(sys.executable).with_name("se-retrofit")
    result = subprocess.run([str(script), "resnet18", "--r", "-3"], cwd=tmp_path, capture_output=True,
                            text=True, env=_offline_env())
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def test_list_attentions(capsys):
    code, out, err = cli(capsys, "--list-attentions")
    assert code == 0 and any(line.startswith("se ") and "Squeeze-and-Excitation" in line
                             for line in out.splitlines())


USER_ATTENTION = user_attention_source("channel_scale")

RELOAD = '''
import sys, torch, timm
from safetensors.torch import load_file
import se_retrofit
try:
    se_retrofit.load(sys.argv[1])
except se_retrofit.RetrofitError as error:  # the module the config names is imported only when trusted
    print("refused" if "trust_code=True" in str(error) else error)
model = se_retrofit.load(sys.argv[1], trust_code=True).eval()
base = timm.create_model("resnet18").eval()
base.load_state_dict({k: v for k, v in load_file(sys.argv[1] + "/model.safetensors").items() if ".se." not in k})
x = torch.randn(1, 3, 64, 64)
print(type(model.layer1[0].se).__module__, type(model.layer1[0].se).__name__, torch.equal(model(x), base(x)))
'''


def test_user_attention_from_outside_the_package(tmp_path):
    (tmp_path / "my_attn.py").write_text(USER_ATTENTION)
    env = {**_offline_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    script = str(Path(sys.executable).with_name("se-retrofit"))
    listed = subprocess.run([script, "--import", "my_attn", "--list-attentions"], capture_output=True,
                            text=True, env=env)
    assert "channel_scale Learned per-channel scale." in listed.stdout
    out = tmp_path / "saved"
    made = subprocess.run([script, "resnet18", "--import", "my_attn", "--attention", "channel_scale",
                           "--weights", "none", "--input-size", "3,64,64", "--out", str(out), "--json"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    report = json.loads(made.stdout)
    assert report["identity_max_abs_diff"] == 0.0 and report["sites"][0]["params"] == 64
    assert json.loads((out / "retrofit_config.json").read_text())["config"]["attention_module"] == "my_attn"
    reloaded = subprocess.run([sys.executable, "-c", RELOAD, str(out)], capture_output=True, text=True, env=env)
    assert reloaded.returncode == 0, reloaded.stderr
    assert reloaded.stdout.split() == ["refused", "my_attn", "ChannelScale", "True"]


def test_missing_user_module_is_a_one_line_error(capsys):
    code, out, err = cli(capsys, "resnet18", "--import", "no_such_module_xyz", "--attention", "x")
    assert code == 2 and err.count("\n") == 1
    assert "cannot import 'no_such_module_xyz', which registers the attention type" in err


@pytest.mark.parametrize("args,message", [
    (["--attention", "nope"], "unknown attention type 'nope'; registered: bam, cam, cbam, danet, eca, gc, nonlocal, pam, se, and timm:NAME"),
    (["--attention", "eca", "--squeeze", "max"], "option squeeze does not apply to attention 'eca' "
                                                  "(it takes: kernel_size, gate)"),
    (["--attention", "se", "--kernel-size", "3"], "option kernel_size does not apply to attention 'se'"),
    (["--blocks", "layer9.*"], "pattern 'layer9.*' matches no residual block (they are named like "
                               "layer1.0 … layer4.1)"),
    (["--exclude", "stem.*"], "pattern 'stem.*' matches no residual block"),
    (["--position", "stage", "--stages", "4"], "stage(s) 4 out of range: stage transitions follow stages 1-3"),
])
def test_family_errors_are_one_line_with_exit_code_2(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "resnet18", "--weights", "none", "--input-size", "3,64,64", *args)
    assert code == 2 and out == "" and list(tmp_path.iterdir()) == []
    assert err.count("\n") == 1 and message in err, err


def test_cbam_inner_dry_run_table(capsys):
    code, out, err = cli(capsys, "resnet50", "--attention", "cbam", "--position", "inner", "--weights", "none",
                         "--input-size", "3,64,64", "--dry-run", "--blocks", "layer1.0")
    assert code == 0, err
    assert "layer1.0 │     1 │       64 │       4 │" in out and "cbam at 'inner'" in out


# --- the identity check is enforced, and not vacuous --------------------------------------------------

class _Double(torch.nn.Module):
    """A registered type whose init_identity is not an identity: it doubles what it is given."""

    def __init__(self, channels, **_):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def init_identity(self):
        with torch.no_grad():
            self.weight.fill_(2.0)

    def forward(self, x):
        return x * self.weight


@pytest.fixture
def double_attention():
    from se_retrofit.attention import register_attention, unregister_attention

    register_attention("double_test")(_Double)
    yield "double_test"
    unregister_attention("double_test")


def test_failed_identity_check_writes_nothing_and_exits_2(capsys, tmp_path, double_attention):
    code, out, err = cli(capsys, "resnet18", "--weights", "none", "--input-size", "3,64,64",
                         "--attention", double_attention, "--out", str(tmp_path / "o"))
    print(err)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("se-retrofit: error: identity check failed: max |Δ| = ")
    assert "trained-like statistics on a copy (the weights are random)" in lines[0]
    assert "nothing was written (pass --allow-nonidentity" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_allow_nonidentity_saves_with_a_warning(capsys, tmp_path, double_attention):
    code, out, err = cli(capsys, "resnet18", "--weights", "none", "--input-size", "3,64,64",
                         "--attention", double_attention, "--out", str(tmp_path / "o"), "--allow-nonidentity",
                         "--json")
    print(err)
    assert code == 0
    assert err.startswith("warning: identity check failed") and "saving anyway (--allow-nonidentity)" in err
    report = json.loads(out)
    assert report["identity_passed"] is False and report["identity_max_rel_diff"] > 0.1
    assert report["identity_statistics"] == "trained-like statistics on a copy (the weights are random)"
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_saved_model_is_the_users_not_the_trained_like_copy(capsys, tmp_path):
    code, out, err = cli(capsys, "resnet18", "--weights", "none", "--input-size", "3,64,64", "--json",
                         "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert json.loads(out)["identity_statistics"].startswith("trained-like statistics on a copy")
    saved = se_retrofit_load(tmp_path / "o")
    # timm zero-initialises each block's last BN scale; the trained-like copy had them in [0.5, 1.5)
    assert all(float(block.bn2.weight.detach().abs().max()) == 0.0 for layer in (saved.layer1, saved.layer4)
               for block in layer)


def test_identity_check_on_own_weights_for_a_weights_file(capsys, tmp_path):
    weights = _mismatched(tmp_path)  # resnet18's own state dict
    code, out, err = cli(capsys, "resnet18", "--weights", str(weights), "--input-size", "3,64,64", "--json",
                         "--out", str(tmp_path / "o"))
    assert code == 0, err
    report = json.loads(out)
    assert report["identity_statistics"] == "the model's own weights" and report["identity_passed"] is True


def se_retrofit_load(path):
    import se_retrofit

    return se_retrofit.load(path)


# --- one shell for both commands --------------------------------------------------------------------

def test_interrupt_is_exit_130_in_one_line(capsys, monkeypatch):
    import se_retrofit.cli_run as cli_module

    monkeypatch.setattr(cli_module, "resolve", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    code, out, err = cli(capsys, "resnet18", "--weights", "none")
    assert code == 130 and err.strip() == "se-retrofit: interrupted; nothing was written"


def test_internal_error_is_one_line_exit_1_and_a_traceback_on_request(capsys, monkeypatch):
    import se_retrofit.cli_run as cli_module

    monkeypatch.setattr(cli_module, "resolve", lambda *a: (_ for _ in ()).throw(ZeroDivisionError("x\ny")))
    code, out, err = cli(capsys, "resnet18", "--weights", "none")
    assert code == 1
    assert err.strip() == ("se-retrofit: internal error: ZeroDivisionError: x / y "
                           "(set SE_RETROFIT_DEBUG=1 for the traceback)")
    monkeypatch.setenv("SE_RETROFIT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["resnet18", "--weights", "none"])


def test_out_of_memory_is_a_user_error(capsys, monkeypatch):
    import se_retrofit.cli_run as cli_module

    def no_memory(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(cli_module, "resolve", no_memory)
    code, out, err = cli(capsys, "resnet18", "--weights", "none")
    assert code == 2 and err.startswith("se-retrofit: error: out of memory (") and err.count("\n") == 1


def test_commands_share_one_shell_without_an_import_cycle():
    import ast
    import inspect

    import se_retrofit.cli
    import se_retrofit.finetune.cli

    def imported(module):
        tree = ast.parse(inspect.getsource(module))
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}

    assert "_shell" in imported(se_retrofit.cli) and "_shell" in imported(se_retrofit.finetune.cli)
    assert "cli" not in imported(se_retrofit.finetune.cli)  # finetune's cli no longer imports the main one
    assert se_retrofit.cli.Parser is se_retrofit.finetune.cli.Parser


def test_import_se_retrofit_does_not_load_the_trainer():
    code = ("import sys, se_retrofit; loaded = 'se_retrofit.finetune' in sys.modules; "
            "run = se_retrofit.finetune.run; print(loaded, 'se_retrofit.finetune.trainer' in sys.modules, "
            "run.__module__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["False", "True", "se_retrofit.finetune.trainer"], result.stderr


def test_the_cli_plans_once_and_counts_parameters_as_the_edit_adds_them(capsys, tmp_path, monkeypatch):
    import se_retrofit.core as core

    calls = {"analyze": 0, "plan_sites": 0}

    def counting(name, function):
        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return counted

    monkeypatch.setattr(core, "analyze", counting("analyze", core.analyze))
    monkeypatch.setattr(core, "plan_sites", counting("plan_sites", core.plan_sites))
    code, out, err = cli(capsys, "resnet18", "--attention", "cbam", "--weights", "none", "--input-size", "3,64,64",
                         "--out", str(tmp_path / "out"), "--json")
    assert code == 0, err
    assert calls == {"analyze": 1, "plan_sites": 1}
    report = json.loads(out)
    assert report["params_after"] - report["params_before"] == report["params_planned"] == 87840
    assert [(s["channels"], s["reduced"], s["params"]) for s in report["sites"]][::2] == \
        [(64, 4, 612), (128, 8, 2148), (256, 16, 8292), (512, 32, 32868)]
