"""The model and the engine on a CUDA device against the CPU (``gpu``: skipped where there is no CUDA device;
bench/gpu_check.sh and bench/rl_gpu_check.py time and train on one).

Different kernels on each side, so floats are compared within fp32 round-off (TF32 off, PyTorch's default for
matmuls: with it on, the logits would move by ~1e-3 and fail) and token ids are compared where no step's top
two logits lie within that round-off of each other."""
import pytest
import torch

from chatfactory.inference.engine import Engine
from chatfactory.inference.sampling import SamplingParams
from chatfactory.model.gpt import GPT, GPTConfig

pytestmark = pytest.mark.gpu


def pair(flavour):
    """The same tiny random GPT on the CPU and on CUDA."""
    torch.manual_seed(0)
    cfg = dict(n_embd=128, head_dim=32, n_kv_head=2) if flavour == "modern" else {}
    cpu = GPT(GPTConfig(flavour=flavour, depth=2, vocab_size=97, block_size=64, **cfg)).eval()
    gpu = GPT(cpu.cfg).to("cuda").eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("flavour", ["gpt2", "modern"])
def test_cuda_logits_are_the_cpus_within_fp32_roundoff(flavour):
    cpu, gpu = pair(flavour)
    idx = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = cpu(idx), gpu(idx.cuda()).cpu()
    # dot products of width 128 through two blocks: fp32 round-off ~1e-6 of logits ~1; a wrong weight moves them ~0.1
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("flavour", ["gpt2", "modern"])
def test_cuda_engine_decodes_the_cpus_greedy_tokens(flavour):
    cpu, gpu = pair(flavour)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
    p = SamplingParams(max_tokens=12, temperature=0)
    assert Engine(gpu).generate(prompts, p) == Engine(cpu).generate(prompts, p)  # ids: barring a near tie
