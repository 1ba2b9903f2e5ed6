"""The saved format's schema (se_retrofit/saved_format.py): every malformed saved directory named in
issue 18 ends as a SavedFormatError (a RetrofitError) with one line naming the problem and what to do,
before anything is built; a FIFO never hangs; a well-typed record that does not fit the model is refused."""
from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

import se_retrofit
from se_retrofit import saved_format
from se_retrofit.config import RetrofitRecord
from se_retrofit.saved_format import CONFIG_FILE, FIX, FIX_BASE, MODEL_FILE, SavedFormatError
from se_retrofit.site import Site

from load_fuzzing import make_saved, time_limit


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return make_saved(tmp_path_factory.mktemp("saved"))


@pytest.fixture
def copy(saved, tmp_path):
    directory = tmp_path / "copy"
    shutil.copytree(saved[0], directory)
    return directory


def edit(directory, change):
    file = directory / CONFIG_FILE
    config = json.loads(file.read_text())
    text = change(config)
    file.write_text(json.dumps(config) if text is None else text)


def put(*path_and_value):
    *path, value = path_and_value

    def change(config):
        target = config
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
    return change


def drop(*path):
    def change(config):
        target = config
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]
    return change


def first_gate(key, value):
    def change(config):
        config["gates"][next(iter(config["gates"]))]["gate"][key] = value
    return change


def refused(directory, match):
    with time_limit(30), pytest.raises(SavedFormatError, match=match) as caught:
        se_retrofit.load(directory)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    return message


CONFIG_CASES = {  # issue 18's list: what was written -> what the message names
    "config []": (lambda c: "[]", "the config must be a JSON object, got a list"),
    "no config key": (drop("config"), "the file lacks the keys config"),
    "sites: 5": (put("sites", 5), "sites must be a list"),
    "a site with an extra key": (put("sites", 0, "bogus", 1), r"sites\[0\] has unknown keys 'bogus'"),
    "a site without channels": (drop("sites", 0, "channels"), r"sites\[0\] lacks the keys channels"),
    "200k-deep JSON": (lambda c: "[" * 200_000 + "]" * 200_000, "nested deeper than 64 levels"),
    "module_name a.b": (put("sites", 0, "module_name", "a.b"), r"sites\[0\].module_name must be a plain attribute"),
    "module_name empty": (put("sites", 0, "module_name", ""), r"sites\[0\].module_name must be a plain attribute"),
    "module_name forward": (put("sites", 0, "module_name", "forward"), "'forward' is an attribute of every nn.Module"),
    "channels 1e12": (put("sites", 0, "channels", 10**12), r"sites\[0\].channels must be an integer from 1 to"),
    "channels -64": (put("sites", 0, "channels", -64), r"sites\[0\].channels must be an integer"),
    "channels '64'": (put("sites", 0, "channels", "64"), r"sites\[0\].channels must be an integer"),
    "spatial_dims 7": (put("sites", 0, "spatial_dims", 7), r"spatial_dims must be an integer from 1 to 3, got 7"),
    "shortcut_arg 5": (put("sites", 0, "shortcut_arg", 5), r"shortcut_arg must be an integer from 0 to 1, got 5"),
    "earlier {}": (put("earlier", {}), "earlier must be a list"),
    "gates []": (put("gates", []), "gates must be an object"),
    "num_classes 1e13": (put("base", "create_kwargs", {"num_classes": 10**13}),
                         "base.create_kwargs.num_classes must be an integer from"),
    "base.name os.system": (put("base", "name", "os.system"), "base.name 'os.system' is not a timm model"),
    "gate scale 'abc'": (first_gate("scale", "abc"), r"gate.scale must be a number"),
    "gate scale NaN": (lambda c: json.dumps(c).replace("1.75", "NaN"), "NaN is not a number JSON allows"),
    "a duplicate key": (lambda c: json.dumps(c).replace('"format"', '"format": "x", "format"', 1),
                        "the key 'format' appears twice"),
    "an unknown top-level key": (put("bogus", 1), "the file has unknown keys 'bogus'"),
    "a probe without its parts": (put("verify", "probe", {"outputs": 1}), "must hold either 'skipped' alone or all of"),
    "another format": (put("format", "se_retrofit/0"), "format is \"se_retrofit/0\", expected 'se_retrofit/2'"),
    "two sites on one module": (lambda c: c["sites"].append(dict(c["sites"][0])), "add the module .* twice"),
    "a gate of no site": (lambda c: c["gates"].update({"head.se": {"gate": {"scale": 1.0, "offset": 0.0}}}),
                          "gates.head.se names no module that a site adds"),
    "an unknown position": (put("config", "position", "sideways"), "config.position must name a position"),
    "options out of range": (put("config", "options", {"kernel_size": 10**9}), "config.options.kernel_size must be"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_a_malformed_config_is_refused_before_anything_is_built(copy, case, monkeypatch):
    change, match = CONFIG_CASES[case]
    edit(copy, change)
    monkeypatch.setattr(se_retrofit.io, "_fresh_base", lambda *a: pytest.fail("built a model from a bad config"))
    message = refused(copy, match)
    assert message.startswith(str(copy / CONFIG_FILE))
    assert message.endswith(FIX_BASE if case in BASE_CASES else FIX)


BASE_CASES = ("num_classes 1e13", "base.name os.system")


@pytest.mark.parametrize("case", BASE_CASES)
def test_the_base_section_is_only_checked_where_load_rebuilds_the_base(saved, copy, case):
    import timm

    edit(copy, CONFIG_CASES[case][0])
    loaded = se_retrofit.load(copy, base_model=timm.create_model("test_resnet", num_classes=10)).eval()
    directory, x, expected = saved
    assert torch.equal(loaded(x), expected)


def test_a_config_that_is_not_utf8_is_refused(copy):
    (copy / CONFIG_FILE).write_bytes(b'{"format": "se_retrofit/1\xff"}')
    refused(copy, r"retrofit_config.json: not UTF-8 text \(byte 25\)")


def test_a_config_too_large_is_refused_unread(copy, monkeypatch):
    monkeypatch.setattr(saved_format, "MAX_CONFIG_BYTES", 1000)
    refused(copy, "bytes, more than a saved config can hold")


@pytest.mark.parametrize("kind,match", [("fifo", "is a FIFO, not a regular file"),
                                        ("directory", "is a directory, not a regular file"),
                                        ("/dev/zero", "is a character device, not a regular file"),
                                        ("missing", "is missing: the saved directory lacks its weights"),
                                        ("empty", "0 bytes, too short for a safetensors file"),
                                        ("dangling link", "is missing")])
@pytest.mark.parametrize("file", [MODEL_FILE, CONFIG_FILE])
def test_a_file_that_is_not_a_regular_file_is_refused_without_hanging(copy, kind, match, file):
    from load_fuzzing import replace_file

    replace_file(copy / file, kind)
    if file == CONFIG_FILE:
        match = {"empty": "not valid JSON", "missing": "retrofit_config.json is missing",
                 "dangling link": "is missing"}.get(kind, match.replace("weights", "model's config"))
    refused(copy, match)


def header_edit(directory, change):
    file = directory / MODEL_FILE
    content = file.read_bytes()
    (length,) = struct.unpack("<Q", content[:8])
    header = json.loads(content[8:8 + length])
    name = next(k for k in header if k.endswith("conv1.weight"))
    raw = change(header, name, content[8 + length:])
    if raw is None:
        encoded = json.dumps(header).encode()
        raw = struct.pack("<Q", len(encoded)) + encoded + content[8 + length:]
    file.write_bytes(raw)


def _offset(header, name, body):
    header[name]["data_offsets"][1] = 10**15


def _relabel(header, name, body):
    header[name]["dtype"] = "I32"


def _shape(header, name, body):
    header[name]["shape"][0] += 1


WEIGHT_CASES = {
    "a header offset of 1e15": (_offset, r"data_offsets\[1\] must be an integer from 0 to"),
    "a length prefix past the end": (lambda h, n, b: struct.pack("<Q", 10**15) + b"{}",
                                     "the header length 1000000000000000 exceeds the file"),
    "a truncated file": (None, None),  # the file cut in half, below
    "a shape that does not fit its bytes": (_shape, "holding .* bytes, where its dtype and shape need"),
    "an int32 tensor where the model has float32": (_relabel, "is torch.int32, the model's is torch.float32"),
    "a header that is a list": (lambda h, n, b: struct.pack("<Q", 2) + b"[]" + b, "the header must be a JSON object"),
}


@pytest.mark.parametrize("case", WEIGHT_CASES)
def test_a_malformed_weights_file_is_refused(copy, case):
    change, match = WEIGHT_CASES[case]
    if case == "a truncated file":
        content = (copy / MODEL_FILE).read_bytes()
        (copy / MODEL_FILE).write_bytes(content[: len(content) // 2])
        match = "data_offsets.* must be an integer from 0 to|exceeds the file"
    else:
        header_edit(copy, change)
    refused(copy, match)


@pytest.mark.parametrize("change,match", [
    (put("base", "create_kwargs", {"bogus": 1}), r"model option 'bogus' is not accepted by timm:test_resnet; it accepts "),
    (lambda c: (c.pop("gates"), c["sites"][0].update(block="layer9.0")) and None, "the model has no module 'layer9.0'"),
    (put("sites", 0, "add_index", 3), "its forward has 1 additions, the plan expects addition #3"),
    (lambda c: c["sites"][0].update(gate="child", anchor="nothere"), "expected one call of 'nothere'"),
])
def test_a_well_typed_record_that_does_not_fit_the_model_is_a_retrofit_error(copy, change, match):
    edit(copy, change)
    with pytest.raises(se_retrofit.RetrofitError, match=match) as caught:
        se_retrofit.load(copy)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("data,match", [([], "the record must be a JSON object"),
                                        ({"sites": []}, "the record lacks the keys config"),
                                        ({"config": {}, "sites": [{"block": 1}]}, r"sites\[0\] has unknown|lacks")])
def test_the_record_parser_refuses_malformed_data(data, match):
    with pytest.raises(SavedFormatError, match=match):
        RetrofitRecord.from_dict(data)


def test_the_site_parser_refuses_malformed_data():
    site = Site("layer1.0", 0, 1, "standard", 64, 2, 1, "se")
    assert Site.from_dict(site.to_dict()) == site
    with pytest.raises(SavedFormatError, match=r"sites\[0\].channels must be an integer from 1 to 1048576"):
        Site.from_dict({**site.to_dict(), "channels": 1e12})


def test_what_save_writes_passes_the_schema(saved):
    saved_format.check_saved_config(json.loads((saved[0] / CONFIG_FILE).read_text()))
    assert set(saved_format.TOP_LEVEL) >= set(json.loads((saved[0] / CONFIG_FILE).read_text()))


def test_the_attention_only_load_reads_through_the_schema_too(copy):
    (copy / "attention.safetensors").write_bytes(b"\x00" * 4)
    import timm

    base = timm.create_model("test_resnet", num_classes=10)
    with pytest.raises(SavedFormatError, match="too short for a safetensors file"):
        se_retrofit.load(copy, base_model=base, weights="attention")
