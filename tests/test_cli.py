"""The command line: the README command, reports, and one-line errors with exit code 2."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from se_retrofit import cli_run
from se_retrofit.cli import main

from helpers import user_attention_source


def cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _offline_env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}


@pytest.mark.slow
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


HEAVY_MODULES = ("torch", "timm", "torchvision", "numpy", "safetensors")


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_help_and_version_import_neither_torch_nor_timm(flag):
    """``se-retrofit --help`` / ``--version`` answer at once: the parser is built before torch is imported."""
    code = ("import json, runpy, sys\n"
            f"sys.argv = ['se-retrofit', {flag!r}]\n"
            "try:\n    runpy.run_module('se_retrofit', run_name='__main__')\nexcept SystemExit as exit:\n"
            "    code = exit.code\n"
            f"print(json.dumps([code, sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY_MODULES!r})]),"
            " file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    exit_code, heavy = json.loads(result.stderr.strip().splitlines()[-1])
    assert exit_code == 0 and heavy == [], heavy[:10]
    assert ("se-retrofit 0.1.0" in result.stdout) if flag == "--version" else ("finetune" in result.stdout)


def test_help_lists_the_commands_and_three_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    commands = text[text.index("commands:"):text.index("examples:")]
    assert [line.split()[0] for line in commands.splitlines()[1:] if line.strip()] == ["MODEL", "finetune", "plan"]
    assert "plan      cost of candidate plans (r × stages) and budgets" in commands
    examples = [line.strip() for line in text[text.index("examples:"):].splitlines()[1:] if line.strip()]
    assert len(examples) == 3 and all(e.startswith("se-retrofit ") for e in examples)
    recipe = Path(__file__).resolve().parent.parent / examples[2].split()[2]
    assert recipe.is_file()  # the finetune example names a recipe that exists


def test_the_parsers_built_in_names_are_the_registries():
    """The parser keeps its own copy of the built-in names (it imports no torch); they must not drift."""
    import se_retrofit.cli as cli_module
    from se_retrofit.analysis import UNIT_KINDS
    from se_retrofit.export import FORMATS
    from se_retrofit.positions import POSITION_HELP

    assert cli_module.UNIT_KINDS == UNIT_KINDS
    assert cli_module.EXPORT_FORMATS == tuple(FORMATS)
    assert cli_module.POSITION_HELP == {k: v for k, v in POSITION_HELP.items() if k in cli_module.POSITIONS}
    assert set(cli_module.POSITIONS) == set(POSITION_HELP)


def test_json_report(capsys, tmp_path):
    code, out, err = cli(capsys, "resnet18", "--weights", "none", "--input-size", "3,64,64", "--json",
                         "--out", str(tmp_path / "o"))
    assert code == 0, err
    report = json.loads(out)
    assert report["blocks_found"] == 8 and len(report["sites"]) == 8
    assert report["identity_max_abs_diff"] == 0.0 and report["dry_run"] is False
    assert report["sites"][0] == {"block": "layer1.0", "unit": "layer1.0", "kind": "residual",
                                  "module": "layer1.0.se", "stage": 1, "channels": 64,
                                  "reduced": 8, "params": 1096, "attention_map_bytes": None,
                                  "flops": 2048}  # 64→8→64 on the pooled vector: 1,024 multiply-adds
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
@pytest.mark.slow
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


def test_existing_output_directory_is_refused_before_anything_is_written(capsys, tmp_path):
    (tmp_path / "o").mkdir()
    code, out, err = cli(capsys, "resnet18", "--weights", "none", "--out", str(tmp_path / "o"), "--input-size",
                         "3,64,64")
    assert code == 2 and "already exists; pass --overwrite" in err
    assert list((tmp_path / "o").iterdir()) == []


BAD_REQUESTS = [(["--stages", "7"], "stage(s) 7 out of range"),
                (["--blocks", "layer9.*"], "pattern 'layer9.*' matches no residual block"),
                (["--weights", "missing.safetensors"], "weights file missing.safetensors does not exist")]


@pytest.mark.parametrize("args,message", BAD_REQUESTS, ids=[a[0] for a, _ in BAD_REQUESTS])
def test_a_bad_request_is_reported_before_an_existing_output_directory(capsys, tmp_path, monkeypatch, args,
                                                                        message):
    """The directory an earlier run saved does not hide what is wrong with the request."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet18-se-standard").mkdir()
    for extra in ([], ["--stages", "3,4"], ["--blocks", "layer3.*"]):  # with the selection's own name too
        selected = [a for a in args if a not in ("--weights", "missing.safetensors")]
        if extra and selected:
            (tmp_path / cli_run.default_out_dir("resnet18", _config(selected))).mkdir(exist_ok=True)
        code, out, err = cli(capsys, "resnet18", "--input-size", "3,64,64", *args,
                             *([] if "--weights" in args else ["--weights", "none"]))
        assert code == 2 and message in err and "already exists" not in err, err


def _config(args):
    from se_retrofit.config import RetrofitConfig

    stages = [int(s) for s in args[1].split(",")] if args[0] == "--stages" else None
    return RetrofitConfig(stages=stages, blocks=args[1:2] if args[0] == "--blocks" else None)


@pytest.mark.slow
def test_default_output_directories_of_different_selections_differ_and_name_the_earlier_run(capsys, tmp_path,
                                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["resnet18", "--weights", "none", "--input-size", "3,64,64"]
    assert cli(capsys, *common)[0] == 0
    assert cli(capsys, *common, "--stages", "3,4")[0] == 0
    assert cli(capsys, *common, "--blocks", "layer4.*", "--every", "2")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "resnet18-se-standard", "resnet18-se-standard-blocks-layer4.x-every2", "resnet18-se-standard-stages3-4"]
    code, out, err = cli(capsys, *common, "--stages", "3,4")
    assert code == 2 and err.strip() == (
        "se-retrofit: error: output directory resnet18-se-standard-stages3-4 already exists (it holds an earlier "
        "run: resnet18, se at standard, stages [3, 4]); pass --overwrite or choose --out, or a different "
        "selection names its own directory")


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# --- words in the report ----------------------------------------------------------------------------

def test_a_transformer_blocks_sub_layers_are_named_in_words(capsys):
    code, out, err = cli(capsys, "test_vit", "--weights", "none", "--dry-run")
    assert code == 0, err
    rows = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│ blocks.")]
    assert rows[:4] == ["blocks.0 (attention)", "blocks.0 (mlp)", "blocks.1 (attention)", "blocks.1 (mlp)"]
    blocks = len(rows) // 2
    assert f"blocks found: {blocks}, with {2 * blocks} residual sub-layers (1 stage: one resolution)" in out
    assert "@" not in out
    code, out, err = cli(capsys, "test_vit", "--weights", "none", "--dry-run", "--json")
    sites = json.loads(out)["sites"]
    assert (sites[1]["unit"], sites[1]["label"]) == ("blocks.0@1", "blocks.0 (mlp)")  # --blocks keeps the name


def test_a_decoder_blocks_sub_layers_are_named_apart():
    from torch import nn

    from se_retrofit import analyze
    from se_retrofit.cli_labels import sublayer_labels

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

        def forward(self, x):
            return self.dec(x, x)

    model = Decoder().eval()
    units = analyze(model, torch.randn(1, 5, 16)).units
    labels = sublayer_labels(model, units)
    assert [labels[u.name] for u in units] == ["dec (attention)", "dec (cross-attention)", "dec (mlp)"]
    assert len(set(labels.values())) == len(units) == 3  # three rows, three names


@pytest.mark.slow
def test_dynamic_spatial_export_names_the_sizes_checked(capsys, tmp_path):
    code, out, err = cli(capsys, "resnet18", "--weights", "none", "--format", "export", "--dynamic-spatial",
                         "--out", str(tmp_path / "o"), "--input-size", "3,64,64")
    assert code == 0, err
    assert "(any batch size; any height and width, checked at 64×64, 96×96)" in out


# --- progress on a terminal -------------------------------------------------------------------------

def _run_on_a_terminal(args, cwd):
    """Run the installed command with stdout and stderr on a pseudo-terminal; what the terminal showed."""
    import pty
    import select

    controller, terminal = pty.openpty()
    env = {**_offline_env(), "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen([sys.executable, "-m", "se_retrofit", *args], cwd=cwd, env=env, stdin=terminal,
                               stdout=terminal, stderr=terminal, close_fds=True)
    os.close(terminal)
    shown = b""
    while True:
        ready, _, _ = select.select([controller], [], [], 300)
        if not ready:
            process.kill()
            break
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    return process.wait(timeout=60), re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode("utf-8", "replace"))


@pytest.mark.slow
def test_progress_shows_each_stage_on_a_terminal_and_nothing_when_piped(tmp_path):
    args = ["resnet18", "--weights", "none", "--input-size", "3,64,64", "--format", "torchscript"]
    code, shown = _run_on_a_terminal([*args, "--out", "t"], tmp_path)
    assert code == 0, shown
    for stage in ("building timm:resnet18 (weights: none)", "analysing resnet18", "editing 8 sites",
                  "checking identity", "saving, exporting (torchscript) and checking the file to t"):
        assert f"✓ {stage}" in shown, (stage, shown[-2000:])
    assert "done in" in shown and "saved to t" in shown
    piped = subprocess.run([sys.executable, "-m", "se_retrofit", *args, "--out", "p"], cwd=tmp_path,
                           env=_offline_env(), capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and piped.stderr == ""
    assert "✓" not in piped.stdout and "building" not in piped.stdout and "saved to p" in piped.stdout
    as_json = subprocess.run([sys.executable, "-m", "se_retrofit", *args, "--out", "j", "--json"], cwd=tmp_path,
                             env=_offline_env(), capture_output=True, text=True, timeout=300)
    assert json.loads(as_json.stdout)["identity_passed"] is True and as_json.stderr == ""
