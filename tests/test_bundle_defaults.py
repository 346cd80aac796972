"""A bundle's "defaults" (bundle.json): every setting the pipeline reads is checked when the bundle is read, so a
broken file is named, with the setting and the fix, before any model loads (sama_core/pipeline.py
check_bundle_defaults)."""

import dataclasses
import json
import logging
import shutil

import pytest

from sama_core.__main__ import main as cli
from sama_core.errors import SamaInputError
from sama_core.pipeline import BUNDLE_DEFAULTS, SamaPipeline, check_bundle_defaults
from sama_core.sampler import SamplerOptions


def test_the_table_covers_every_setting_the_pipeline_reads_from_defaults():
    # sampler_options takes any SamplerOptions field from the defaults; edit_frames / sample_edit read these two
    read_by_the_pipeline = {f.name for f in dataclasses.fields(SamplerOptions)} | {"target_area", "keep_unchanged"}
    assert set(BUNDLE_DEFAULTS) == read_by_the_pipeline


def test_every_value_the_code_itself_defaults_to_is_accepted():
    defaults = {f.name: getattr(SamplerOptions(), f.name) for f in dataclasses.fields(SamplerOptions)}
    defaults.update(SamplerOptions.fast().__dict__)  # the fast preset's unipc / cache / batch_cfg values
    check_bundle_defaults(defaults, "bundle.json")
    for flowedit in (True, False, "auto"):
        check_bundle_defaults({"flowedit": flowedit}, "bundle.json")
    check_bundle_defaults({"target_area": 64 * 64, "keep_unchanged": 0, "denoise": 1, "window_latent_frames": None},
                          "bundle.json")


def test_the_shipped_bundles_defaults_are_accepted():
    from sama_core.commands.demo import TRAINED_BUNDLE
    spec = json.loads((TRAINED_BUNDLE / "bundle.json").read_text())
    check_bundle_defaults(spec["defaults"], TRAINED_BUNDLE / "bundle.json")


BAD = [("steps", "20", "an integer >= 1"), ("steps", 0, "an integer >= 1"), ("steps", 2.5, "an integer >= 1"),
       ("steps", True, "an integer >= 1"), ("guidance", "high", "a number"), ("guidance", None, "a number"),
       ("shift", -1, "a number > 0"), ("shift", 0, "a number > 0"), ("denoise", 0, "a number > 0 and <= 1"),
       ("denoise", 1.5, "a number > 0 and <= 1"), ("keep_unchanged", 2, "a number >= 0 and <= 1"),
       ("keep_unchanged", "0.2", "a number >= 0 and <= 1"), ("flowedit", "maybe", 'one of true, false, "auto"'),
       ("flowedit", 1, 'one of true, false, "auto"'), ("solver", "heun", 'one of "euler", "unipc"'),
       ("target_area", "big", "an integer >= 1"), ("seed", 1.5, "an integer >= 0"),
       ("window_latent_frames", 0, "an integer >= 1 or null"), ("batch_cfg", "yes", "one of true, false")]


@pytest.mark.parametrize("key,value,rule", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_a_bad_default_is_refused_naming_the_file_the_setting_and_the_rule(tmp_path, key, value, rule):
    # a bundle folder with no model files at all: the error must come from bundle.json, before any file loads
    (tmp_path / "bundle.json").write_text(json.dumps({"dit": "dit.safetensors", "vae": "vae.safetensors",
                                                      "text_encoder": "te.safetensors", "defaults": {key: value}}))
    with pytest.raises(SamaInputError) as error:
        SamaPipeline.from_bundle(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "bundle.json") in message
    assert f"defaults.{key} must be {rule}, got {json.dumps(value)}" in message
    assert 'remove it from the bundle\'s "defaults"' in message


def test_the_cli_reports_a_bad_default_with_exit_2_and_writes_nothing(bundle, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    spec = json.loads((broken / "bundle.json").read_text())
    spec["defaults"]["steps"] = "twenty"
    (broken / "bundle.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    assert cli(["demo", "--bundle", str(broken), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert 'defaults.steps must be an integer >= 1, got "twenty"' in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_an_unknown_setting_is_ignored_with_a_warning_that_names_the_nearest_one(bundle, tmp_path, caplog):
    folder = tmp_path / "typo"
    shutil.copytree(bundle, folder)
    spec = json.loads((folder / "bundle.json").read_text())
    spec["defaults"]["stepz"] = 2
    (folder / "bundle.json").write_text(json.dumps(spec))
    with caplog.at_level(logging.WARNING, logger="sama_core.pipeline"):
        pipe = SamaPipeline.from_bundle(folder, device="cpu")
    assert "'stepz', ignored (did you mean 'steps'?)" in caplog.text
    assert pipe.sampler_options().steps == spec["defaults"]["steps"]  # the known setting, not the typo
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sama_core.pipeline"):
        SamaPipeline.from_bundle(folder, device="cpu")
    assert "stepz" not in caplog.text  # once per bundle and name (the demo reads bundle.json twice)
