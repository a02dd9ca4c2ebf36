"""Tiny random backbones (the micro shape as Qwen3 and Llama) built in code: the suite never downloads anything."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from transformers import LlamaForCausalLM, Qwen3ForCausalLM  # noqa: E402

from backbone_shapes import backbone_config  # noqa: E402
from modeling_duplex import DuplexForCausalLM  # noqa: E402


def tiny_backbone(arch: str) -> torch.nn.Module:
    """The micro backbone shape (backbone_shapes.py), random weights (seed 0), as Qwen3 or Llama."""
    torch.manual_seed(0)
    if arch == "qwen3":
        return Qwen3ForCausalLM(backbone_config("micro")).eval()
    return LlamaForCausalLM(backbone_config("micro", model_type="llama")).eval()


def perturb_duplex(model: DuplexForCausalLM, seed: int = 1, scale: float = 0.2) -> DuplexForCausalLM:
    """Move every duplex weight (the zero-initialised gates and output projections too) away from its initial value;
    the gates open wide, so that updates visibly change what this random model writes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.duplex_state_dict().items():
            param.add_(torch.randn(param.shape, generator=generator) * scale + (2.0 if name.endswith("gate") else 0.0))
    return model


@pytest.fixture(params=["qwen3", "llama"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def backbone(arch):
    return tiny_backbone(arch)


@pytest.fixture
def duplex(backbone) -> DuplexForCausalLM:
    """A trained-looking duplex model (non-zero adapters) over a tiny backbone."""
    model = DuplexForCausalLM.from_backbone(backbone, num_slots=4, encoder_layers=2, adapter_layers=[0, 2])
    return perturb_duplex(model).eval()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for servers the tests start)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_in_fresh_process(script: str, *args: str, cwd: Path, timeout: int) -> dict:
    """Run `script` with `args` in a new Python process started in `cwd` (outside the repository: the project is not
    importable there) and return the JSON object its last printed line holds."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
