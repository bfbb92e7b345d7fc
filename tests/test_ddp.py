"""Every registered head trains under DistributedDataParallel: 2 gloo processes on the CPU,
the real optimisation step (`heads.epoch.train_one_epoch`), and train metrics all-reduced
over the ranks. Cheap on purpose (tiny heads, 3 steps), so it runs with every head; one pair
of processes trains them all in turn (each spawned rank's imports cost more than its heads)."""

from __future__ import annotations

import inspect
import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from ekx.heads import models

SMALL = {"d_model": 32, "heads": 2, "layers": 2, "hidden": 32, "windows": (2, 4)}  # where a head takes them


def _worker(rank: int, world: int, heads: list[str], rendezvous: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    from ekx.heads.config import TrainConfig
    from ekx.heads.epoch import train_one_epoch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    result: dict = {}
    for head in heads:
        try:
            params = inspect.signature(models.REGISTRY[head]).parameters
            hp = {k: v for k, v in SMALL.items() if k in params}
            torch.manual_seed(0)  # the same initial weights on every rank, as DDP requires
            model = models.create(head, dim=16, num_verbs=5, num_nouns=7, frames=4, dropout=0.1, drop_path=0.1, **hp)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
            gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as a sampler gives
            batch = 4 if rank == 0 else 2  # and its own share size
            batches = [
                (
                    torch.randn(batch, 4, 16, generator=gen),
                    torch.randint(5, (batch,), generator=gen),
                    torch.randint(7, (batch,), generator=gen),
                )
                for _ in range(3)
            ]
            cfg = TrainConfig(head=head, lr=1e-3, warmup_epochs=0.0, label_smoothing=0.0)
            m = train_one_epoch(ddp, opt, iter(batches), len(batches), cfg, 0, torch.device("cpu"), "fp32")
            result[head] = {"metrics": m, "weights": float(sum(p.double().sum() for p in model.parameters()))}
        except Exception as e:  # reported to the test, which names it
            result[head] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            break  # the other rank may wait in a collective this one never reaches
    Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> list[dict]:
    """Every head trained under DDP by one pair of ranks: each rank's {head: result}."""
    tmp = tmp_path_factory.mktemp("ddp")
    ctx = mp.get_context("spawn")
    heads = sorted(models.REGISTRY)
    outs = [tmp / f"rank{r}.json" for r in range(2)]
    procs = [ctx.Process(target=_worker, args=(r, 2, heads, str(tmp / "rdv"), str(outs[r]))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
    return [json.loads(o.read_text()) if o.is_file() else {} for o in outs]


@pytest.mark.parametrize("head", sorted(models.REGISTRY))
@pytest.mark.slow
def test_every_head_trains_under_ddp_with_metrics_reduced_over_ranks(head, trained):
    assert all(head in r for r in trained), f"a rank died or hung before {head} ended: {trained}"
    r0, r1 = (r[head] for r in trained)
    assert "error" not in r0 and "error" not in r1, (r0, r1)
    # DDP kept the replicas identical: every parameter received its all-reduced gradient
    assert r0["weights"] == pytest.approx(r1["weights"], rel=1e-6)
    # ranks saw different data; the logged train loss and accuracies are over both ranks' samples
    assert r0["metrics"] == pytest.approx(r1["metrics"], rel=1e-9)
