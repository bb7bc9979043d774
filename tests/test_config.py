"""YAML presets into frozen dataclasses: unknown keys refused, overrides applied, values checked."""

import dataclasses
import glob
import os

import pytest

from hpc_llama.config import CONFIG_DIR, SECTIONS, load_sections, parse_override
from hpc_llama.errors import HpcLlamaError


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))))
def test_every_preset_loads(path):
    import yaml

    sections = load_sections(path)
    written = yaml.safe_load(open(path))
    assert set(written) <= set(sections) and all(sections[k] is not None for k in written)


def test_real_shapes_have_their_published_parameter_counts():
    # Llama-2-7B has 6.74B parameters, Llama-3-8B 8.03B (as published).
    assert round(load_sections("llama2-7b")["model"].n_params / 1e9, 2) == 6.74
    assert round(load_sections("llama3-8b")["model"].n_params / 1e9, 2) == 8.03


def test_sections_are_frozen():
    s = load_sections("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s["model"].dim = 3


def test_overrides_apply_in_yaml_syntax():
    s = load_sections("tiny", ["model.n_layers=6", "parallel.pp=2", "model.eos_ids=[2, 3]", "model.norm_eps=1e-6"])
    assert s["model"].n_layers == 6 and s["parallel"].pp == 2
    assert s["model"].eos_ids == (2, 3) and s["model"].norm_eps == 1e-6


@pytest.mark.parametrize("text, message", [
    ("model:\n  dimm: 3\n", "unknown key 'dimm'"),
    ("modle:\n  dim: 3\n", "unknown section 'modle'"),
    ("model:\n  dim: three\n", "expected int"),
    ("parallel:\n  pp: 0\n", "at least 1"),
    ("parallel:\n  dtype: fp8\n", "dtype must be"),
    ("model: [1, 2]\n", "expected a mapping"),
    ("model: {dim: 3\n", "not valid YAML"),
])
def test_bad_yaml_is_refused_with_the_key_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(HpcLlamaError, match=message):
        load_sections(str(path))


def test_unknown_override_key_is_refused():
    with pytest.raises(HpcLlamaError, match="unknown key 'layers'"):
        load_sections("tiny", ["model.layers=3"])
    with pytest.raises(HpcLlamaError, match="section.key=value"):
        parse_override("model.dim")


def test_missing_preset_names_the_directory():
    with pytest.raises(HpcLlamaError, match="no such file or preset"):
        load_sections("nope")


def test_every_field_of_every_section_has_a_docstring():
    # Each field is documented by a string right under it, in every section a preset can hold.
    import ast
    import inspect
    import textwrap

    assert {"model", "parallel", "score", "train", "generate"} <= set(SECTIONS)
    for cls in SECTIONS.values():
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        documented = {stmt.target.id for stmt, after in zip(body, body[1:])
                      if isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr)
                      and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)
                      and after.value.value.strip()}
        fields = [f.name for f in dataclasses.fields(cls)]
        assert fields, cls.__name__
        missing = [f for f in fields if f not in documented]
        assert not missing, f"{cls.__name__}: no docstring under {', '.join(missing)}"


@pytest.mark.parametrize("preset", ["mistral-7b", "qwen2.5-7b", "qwen3-8b", "llama3.2-1b", "llama3.1-8b"])
def test_family_presets_count_what_the_family_class_builds(preset):
    # The family's own transformers class, built empty from the config we would export, has exactly the
    # parameters we count (q/k/v biases, q/k norms and tied heads included).
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hpc_llama.checkpoint.hf import hf_config_from_model

    cfg = load_sections(preset)["model"]
    hf = hf_config_from_model(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{k: v for k, v in hf.items()
                                                                        if k != "architectures"}))
    assert type(model).__name__ == hf["architectures"][0]
    assert model.num_parameters() == cfg.n_params
