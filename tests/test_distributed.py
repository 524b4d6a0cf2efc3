"""The Transformer and fa.nn.MultiheadAttention under torch.distributed: DDP and FSDP (fully_shard) with gloo, two
processes on the CPU, the reference backend. After one backward every rank's gradients must be equal, and equal
(under tests/tolerance.py's rule) to one process's gradients on the two ranks' batches concatenated."""
import os
import time
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import fast_attention as fa
from fast_attention.models import Transformer, TransformerConfig
from tolerance import assert_close

WORLD = 2
PER_RANK = 2  # sequences per rank
LENGTH = 9
VOCAB = 29
WIDTH = 16
TIMEOUT_S = 150

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


def make_model(dtype=torch.float32) -> Transformer:
    torch.manual_seed(0)  # the same initial weights in every process (DDP would also broadcast rank 0's)
    cfg = TransformerConfig(vocab_size=VOCAB, max_seq_len=16, n_layers=2, d_model=WIDTH, n_heads=2, n_kv_heads=1,
                            d_ff=24, dropout=0.0, pos_encoding="rope", backend="reference")
    return Transformer(cfg).to(dtype)


def make_mha(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return fa.nn.MultiheadAttention(WIDTH, 2, batch_first=True, backend="reference").to(dtype)


def global_batch(dtype=torch.float32):
    """Every rank's data, (WORLD * PER_RANK, ...): tokens, next tokens, and float inputs for the MHA module."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (WORLD * PER_RANK, LENGTH), generator=g)
    y = torch.randint(0, VOCAB, (WORLD * PER_RANK, LENGTH), generator=g)
    h = torch.randn(WORLD * PER_RANK, LENGTH, WIDTH, generator=g, dtype=torch.float64).to(dtype)
    return x, y, h


def model_loss(model, x, y) -> torch.Tensor:
    return model(x, y)[1]  # mean over tokens: with equal shards, the mean of the ranks' losses is the global one


def mha_loss(mha, h) -> torch.Tensor:
    return mha(h, h, h, need_weights=False)[0].square().mean()


def _gradients(module) -> dict:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two processes share the CPU
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, y, h = global_batch()
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        results = {}

        ddp = DistributedDataParallel(make_model())
        loss = model_loss(ddp, x[mine], y[mine])
        loss.backward()
        results["ddp_model"], results["ddp_loss"] = _gradients(ddp.module), loss.item()
        torch.optim.SGD(ddp.parameters(), lr=0.1).step()
        results["ddp_params_after_step"] = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}

        ddp_mha = DistributedDataParallel(make_mha())
        mha_loss(ddp_mha, h[mine]).backward()
        results["ddp_mha"] = _gradients(ddp_mha.module)

        try:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            # A CPU mesh named outright: by default fully_shard meshes the CUDA devices whenever torch sees one (on
            # the H200 machine, torch 2.11, these gloo workers died with SIGSEGV after its warning about that).
            mesh = init_device_mesh("cpu", (WORLD,))
            model = make_model()
            for block in model.decoder:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            model_loss(model, x[mine], y[mine]).backward()
            # each rank holds a shard of every gradient (a DTensor); full_tensor() gathers it
            results["fsdp"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
            # A control in plain torch: the same sample on every rank gives a bias gradient of 1 once averaged
            # across ranks, WORLD where this torch's FSDP sums them instead (torch 2.8 on gloo does).
            control = torch.nn.Linear(WIDTH, 1)
            fully_shard(control, mesh=mesh)
            control(torch.ones(1, WIDTH)).sum().backward()
            results["fsdp_control"] = control.bias.grad.full_tensor().item()
        except Exception as e:  # an FSDP build without CPU/gloo support: reported, and the test skips with it
            results["fsdp"] = f"{type(e).__name__}: {e}"
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run every scenario once, in WORLD spawned processes; each rank's results, in rank order."""
    folder = tmp_path_factory.mktemp("distributed")
    # The workers are CPU processes: on a GPU machine they see no GPU, so nothing in torch.distributed picks CUDA.
    with mock.patch.dict(os.environ, {"CUDA_VISIBLE_DEVICES": ""}):
        context = mp.start_processes(_worker, args=(str(folder / "store"), str(folder)), nprocs=WORLD, join=False,
                                     start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=2):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the distributed workers did not finish within {TIMEOUT_S} s")
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


def single_process_gradients(make, loss_fn, *data_indices):
    """Gradients of one process over the whole global batch, in float32 and in float64 (the oracle)."""
    out = []
    for dtype in (torch.float32, torch.float64):
        module = make(dtype)
        data = global_batch(dtype)
        loss_fn(module, *(data[i] for i in data_indices)).backward()
        out.append(_gradients(module))
    return out


def check_gradients(per_rank: list[dict], single32: dict, single64: dict, exact_across_ranks: bool = True):
    assert per_rank[0].keys() == single64.keys()
    for name in single64:
        for r in range(1, WORLD):
            if exact_across_ranks:  # all-reduce hands every rank the same sum
                assert torch.equal(per_rank[r][name], per_rank[0][name]), f"{name}: rank {r} differs from rank 0"
        for r in range(WORLD):
            assert_close(per_rank[r][name], single32[name], single64[name], f"rank {r}'s gradient of {name}")


def test_ddp_transformer_gradients_match_single_process(ranks):
    assert ranks[0]["ddp_loss"] != ranks[1]["ddp_loss"], "the ranks must have trained on different data"
    single32, single64 = single_process_gradients(make_model, model_loss, 0, 1)
    check_gradients([r["ddp_model"] for r in ranks], single32, single64)
    for name, p in ranks[0]["ddp_params_after_step"].items():
        assert torch.equal(ranks[1]["ddp_params_after_step"][name], p), f"{name} diverged after the step"


@pytest.mark.skipif(not hasattr(fa.nn, "MultiheadAttention"), reason="fa.nn.MultiheadAttention is not there")
def test_ddp_multihead_attention_gradients_match_single_process(ranks):
    single32, single64 = single_process_gradients(make_mha, mha_loss, 2)
    check_gradients([r["ddp_mha"] for r in ranks], single32, single64)


def test_fsdp_transformer_gradients_match_single_process(ranks):
    if isinstance(ranks[0]["fsdp"], str):
        pytest.skip(f"FSDP fully_shard does not run on CPU with gloo in this torch build: {ranks[0]['fsdp']}")
    if ranks[0]["fsdp_control"] != 1.0:
        pytest.skip(f"torch {torch.__version__}'s FSDP on gloo does not average gradients across ranks (a plain "
                    f"nn.Linear's bias gradient is {ranks[0]['fsdp_control']}, expected 1.0), so it cannot judge ours")
    single32, single64 = single_process_gradients(make_model, model_loss, 0, 1)
    check_gradients([r["fsdp"] for r in ranks], single32, single64)
