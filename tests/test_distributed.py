"""torch.distributed: 2 gloo ranks on the CPU against the single-process results (issue 17).

Starting processes is the expensive part (each imports torch), so two launches serve every test:

1. ``torch.multiprocessing.spawn`` of 2 ranks (module fixture ``two_ranks``) computes, on shards of the
   data: the sharded MMD (biased, unbiased; dense and tiled kernel sums) and mean embedding, the streamed
   mean embedding of an ``IterableDataset``, a parallel evaluation, DM and DC class-parallel condensation, the
   rows that couple all of S (KIP, RFAD, DD, ESP, RCIG), DCC, MTT with soft labels, IDC (its pool with
   ``pool_augment``), HaBa, CAFE, LCMat, GLaD, IT-GAN, WMDD, channel_efficient and DCGM (``COUPLED``);
   then it starts a checkpointed DM run in which rank 1 is SIGKILLed right after the checkpoint of
   iteration 1 of 2 (the launch fails, as it must);
2. ``torchrun --standalone --nproc_per_node 2 -m ipmcondense condense ... --resume`` continues that run from
   its checkpoint through the command line.

Every result is compared here with the single-process computation of the same thing. Cost: about 45 CPU
seconds in all (seven interpreter start-ups, each importing torch, are most of it); the tests that need the
launches are marked ``slow``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ipmcondense import distributed

WORLD = 2
#: the tiny class-conditional GAN of the latent-space rows (GLaD, IT-GAN)
GENERATOR = Path(__file__).resolve().parent / "fixtures" / "generator-digits-tiny"
TINY = {"iterations": 2, "seed": 0, "progress": False}
DC = {"iterations": 1, "seed": 0, "progress": False, "outer_loop": 2, "inner_loop": 1}  # two image steps on one
# network, trained on all of S between them (the exchange of S before the inner loop is exercised)
KILLED = {"iterations": 2, "checkpoint_every": 1, "seed": 3}
#: IDM: the pool (3 networks, 2 training steps of 4 images per class each) is trained on all classes, split
IDM = {"iterations": 3, "seed": 5, "progress": False, "batch_real": 8, "train_steps": 2, "batch_pool": 4,
       "pool_size": 3}
#: MTT: 3 student steps on mini-batches of 6 of the 20 images (a batch can miss a rank's classes), memory-lean
MTT = {"iterations": 2, "seed": 5, "progress": False, "arch": "convnet-w32", "max_start_epoch": 1,
       "expert_epochs": 1, "syn_steps": 3, "lr_images": 1.0, "batch_syn": 6}
#: DC with DREAM's k-means batches: 4 image steps share one k-means query, a checkpoint after it
DREAM = {"iterations": 2, "seed": 0, "progress": False, "outer_loop": 2, "inner_loop": 1, "batch_real": 4,
         "dream_interval": 4, "dream_max_iter": 10, "checkpoint_every": 1}
#: the rows whose objective couples all of S (parallel.WholeSetOnEveryRank) and MTT with learned soft labels:
#: (method, options), 2-3 image steps each on a 10-image real batch per class; each run checkpoints at its end
COUPLED = {
    "kip": ("kip", {"ipc": 2, "iterations": 3, "batch_real": 10, "learn_labels": True}),
    "rfad": ("rfad", {"ipc": 1, "iterations": 3, "batch_real": 10, "n_models": 2, "rf_width": 16}),
    "dd": ("dd", {"ipc": 2, "iterations": 3, "batch_real": 10, "dd_steps": 2, "dd_epochs": 1}),
    "esp": ("esp", {"ipc": 1, "iterations": 3, "batch_real": 10, "dd_steps": 2, "arch": "convnet-w32"}),
    "rcig": ("rcig", {"ipc": 1, "iterations": 3, "batch_real": 10, "rcig_pool_models": 2, "rcig_inner_steps": 3,
                      "rcig_hinv_steps": 3, "arch": "convnet-w32"}),
    "mtt_soft_labels": ("mtt", {**MTT, "ipc": 2, "soft_labels": True, "memory_lean": True}),
    "dcc": ("dcc", {"ipc": 1, "iterations": 1, "outer_loop": 1, "inner_loop": 1}),
    # the pool trained with per-sample DSA drawn for the whole batch (IDC's pool_augment), S stored multi-formation
    "idc": ("idc", {"ipc": 1, "iterations": 2, "batch_real": 8, "train_steps": 2, "batch_pool": 4}),
    # every class's prototype gathered for the discrimination term; the watched network's per-class accuracies
    # gathered; two image steps with one epoch of training on the whole S between them
    "cafe": ("cafe", {"ipc": 1, "iterations": 1, "batch_real": 8, "watch_window": 2, "watch_batch": 4,
                      "max_steps_per_network": 2, "max_inner_epochs": 1}),
    # the worst-case perturbation from the loss gap of every class (gap and its gradient summed over the ranks)
    "lcmat": ("lcmat", {"ipc": 1, "iterations": 1, "outer_loop": 1, "inner_loop": 1}),
    # shared hallucinators (their MTT gradient summed over the ranks), the club term and the extractor's training
    # on the whole bases; one image step: after it, MTT's loss on this 1-epoch buffer amplifies the 1e-6 rounding
    # of the state ~1e4 times (measured: the one-process loss from the 2-rank state moves 5e-3)
    "haba": ("haba", {"ipc": 1, "iterations": 1, "seed": 5, "arch": "convnet-w32", "max_start_epoch": 1,
                      "expert_epochs": 1, "syn_steps": 3, "n_hallucinators": 2, "lr_images": 10.0, "lr_extractor": 0.1,
                      "memory_lean": True}),
    # latents over the fixture's fixed generator, owned by class block (the whole set decoded on every rank)
    "glad": ("glad", {"ipc": 1, "iterations": 2, "generator": str(GENERATOR)}),
    # IT-GAN: as glad, plus the anchor term (each rank adds its rows' distances over the whole n)
    "itgan": ("itgan", {"ipc": 1, "iterations": 2, "inversion_steps": 5, "lr_images": 0.05, "generator": str(GENERATOR)}),
    # WMDD: the teacher trained on every class (gradients summed), each class's barycenter draws made by every rank
    # (dropped by the others), the norm-statistics and teacher cross-entropy terms as shares of their means
    "wmdd": ("wmdd", {"ipc": 2, "iterations": 2, "batch_real": 8, "pretrain_steps": 3, "barycenter_iterations": 5}),
    # channel-wise stored tensors owned by class block; two image steps with a network update on the whole S between
    "channel_efficient": ("channel_efficient", {"ipc": 1, "iterations": 1, "outer_loop": 2, "inner_loop": 1}),
    # DCGM: latents by class block, the generator replicated (its gradients summed), the GAN and contrast terms as
    # shares (every class's synthetic centre gathered), the discriminator trained replicated (gradients summed);
    # lr_generator 100 x the row's and the three terms' weights 10 x so that unsummed or unshared terms would show
    "dcgm": ("dcgm", {"ipc": 2, "iterations": 2, "lr_generator": 0.01, "gan_weight": 1.0, "intra_weight": 1.0,
                      "inter_weight": 1.0, "generator": str(GENERATOR)}),
}
#: the coupled rows agree with one process to this fraction of the largest magnitude of each learned tensor (images,
#: learned label rows, step sizes, temperature): the real batch's sum and S's gradient are sums of 2 partial sums;
#: measured at most 6e-6 (kip, whose Adam step divides by the root of tiny squared gradients), 1e-6 elsewhere
COUPLED_RELATIVE_TOLERANCE = 2e-5
#: the MTT engine run agrees with one process to this fraction of the images' largest magnitude: the split sum
#: changes the float32 gradient by ~5e-6 of its size (measured), less than float32's own error of the MTT
#: gradient against float64 (up to 8e-5: the loss divides nearly cancelling parameter differences)
MTT_RELATIVE_TOLERANCE = 1e-4


def _points(seed: int, n: int, shift: float) -> torch.Tensor:
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


X_ALL, Y_ALL = _points(1, 61, 0.0), _points(2, 47, 0.4)


class _Stream(torch.utils.data.IterableDataset):
    """Rows of ``X_ALL`` produced on the fly, 7 at a time, split between ranks by batch (never all at once)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __iter__(self):
        for k, start in enumerate(range(0, X_ALL.shape[0], 7)):
            if k % self.world == self.rank:
                yield X_ALL[start:start + 7]


def _tiny_set():
    from ipmcondense.data import load_dataset

    ds = load_dataset("digits")
    keep = torch.cat([torch.nonzero(ds.train_labels == c, as_tuple=True)[0][:2] for c in range(10)])
    return ds, ds.train_images[keep], ds.train_labels[keep]


def _evaluate(spread: bool):
    from ipmcondense.evaluation import EvaluationProtocol, evaluate_synthetic

    ds, images, labels = _tiny_set()
    protocol = EvaluationProtocol(epochs=1, augmentation="none")
    return evaluate_synthetic(images, labels, ds, protocol, n_models=3, seed=5, spread_over_ranks=spread).accuracies


def _unroll_problem():
    """A float64 student (convnet-w32, 4 classes of 3 images) and a target for MTT's loss."""
    from ipmcondense.augment import DifferentiableSiameseAugmentation
    from ipmcondense.nets import build_isolated, get_network

    net = build_isolated(lambda: get_network("convnet-w32", 1, 4, (8, 8)), 0).double()
    theta0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    g = torch.Generator().manual_seed(1)
    target = theta0 + 0.01 * torch.randn(theta0.shape, dtype=torch.float64, generator=g)
    images = torch.randn(12, 1, 8, 8, dtype=torch.float64, generator=g)
    return net, theta0, target, images, torch.arange(4).repeat_interleave(3), DifferentiableSiameseAugmentation()


UNROLLS = [(lean, batch) for lean in (False, True) for batch in (None, 5)]


def _unroll_gradients(owned, lean: bool, batch):
    """MTT's loss and its gradients in the images and the step size: the full unroll or the memory-lean pass."""
    from ipmcondense.autodiff import unrolled_sgd
    from ipmcondense.condensation.objectives.trajectory import (
        trajectory_matching_loss,
        trajectory_matching_loss_and_grads,
    )

    net, theta0, target, images, labels, augment = _unroll_problem()
    lr, generator = torch.tensor(0.05, dtype=torch.float64), torch.Generator().manual_seed(3)
    if lean:
        result = trajectory_matching_loss_and_grads(net, theta0, target, images, labels, lr, 4, batch, augment,
                                                    generator, owned=owned)
        return result.loss, result.images_grad, result.lrs_grad
    images, lr = images.requires_grad_(True), lr.requires_grad_(True)
    end = unrolled_sgd(net, theta0, images, labels, lr, 4, batch, augment, generator, owned=owned)
    loss = trajectory_matching_loss(end, theta0, target)
    return (loss.detach(), *torch.autograd.grad(loss, [images, lr]))


def _coupled(method: str, options: dict, folder) -> dict:
    """A coupled row's options with the fixture's expert buffer where the row reads one (ESP, MTT, HaBa)."""
    experts = {"experts": str(Path(folder) / "experts")} if method in ("esp", "mtt", "haba") else {}
    return {"seed": 0, **options, "progress": False, **experts}


def _worker(rank: int, world: int, init: str, folder: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from ipmcondense.condensation.api import condense
    from ipmcondense.condensation.engine import CondensationEngine
    from ipmcondense.ipm.sharded import (
        row_block,
        sharded_mean_embedding_distance,
        sharded_mmd2,
        streaming_mean_embedding,
    )

    xl, yl = X_ALL[row_block(61, rank, world)], Y_ALL[row_block(47, rank, world)]
    sampler = torch.utils.data.DistributedSampler(torch.utils.data.TensorDataset(X_ALL[:60]), num_replicas=world,
                                                  rank=rank, shuffle=False)
    x_sampled = X_ALL[:60][list(sampler)]
    out = {
        "mmd2": {(est, backend): float(sharded_mmd2(xl, yl, estimator=est, backend=backend, bandwidth=1.5))
                 for est in ("biased", "unbiased") for backend in ("dense", "tiled")},
        "mmd2_median_sampler": float(sharded_mmd2(x_sampled, yl, estimator="biased")),
        "mean_embedding": float(sharded_mean_embedding_distance(xl, yl, feature_map=torch.tanh)),
        "stream": streaming_mean_embedding(torch.utils.data.DataLoader(_Stream(rank, world), batch_size=None))[0],
        "evaluation": _evaluate(spread=True),
        "dm": condense("dm", "digits", ipc=2, **TINY).images,
        "dc": condense("dc", "digits", ipc=1, **DC).images,
        "sliced": condense("dm", "digits", ipc=2, discrepancy="sliced", n_projections=16, **TINY).images,
        "idm": condense("idm", "digits", ipc=2, out=Path(folder) / f"idm-{world}", **IDM).images,
        "mtt": condense("mtt", "digits", ipc=2, experts=str(Path(folder) / "experts"), memory_lean=True, **MTT),
    }
    for name, (method, options) in COUPLED.items():
        condense(method, "digits", out=Path(folder) / f"{name}-{world}", **_coupled(method, options, folder))
    dream = condense("dc", "digits", ipc=1, real_batches="dream", out=Path(folder) / f"dream-{world}", **DREAM)
    out["dream"] = dream.images
    out["mtt"] = (out["mtt"].images, out["mtt"].learning_rate, out["mtt"].metrics["loss_history"])
    labels = _unroll_problem()[4]
    owned = (labels >= 2 * rank) & (labels < 2 * rank + 2)  # rank r owns classes 2r and 2r + 1
    out["unroll"] = {case: _unroll_gradients(owned, *case) for case in UNROLLS}
    from ipmcondense.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the command line inside the job: sharded rows, rank 0 prints
        main(["distance", str(Path(folder) / "x.pt"), str(Path(folder) / "y.pt"), "--metric", "mmd2"])
    out["distance_cli"] = printed.getvalue()
    torch.save(out, Path(folder) / f"rank{rank}.pt")

    original = CondensationEngine.save_checkpoint

    def save_then_die(self):
        original(self)
        if rank == 1 and self.iteration == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    CondensationEngine.save_checkpoint = save_then_die
    condense("dm", "digits", ipc=1, out=Path(folder) / "killed", **KILLED, progress=False)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_ranks")
    torch.save(X_ALL, folder / "x.pt")
    torch.save(Y_ALL, folder / "y.pt")
    from ipmcondense.data import load_dataset
    from ipmcondense.trajectories import train_experts

    torch.set_num_threads(1)
    train_experts(load_dataset("digits"), 1, 1, folder / "experts", arch="convnet-w32", progress=False, seed=0)
    with pytest.raises(Exception) as failure:  # the last scenario kills rank 1
        torch.multiprocessing.spawn(_worker, args=(WORLD, f"file://{folder}/rendezvous", str(folder)),
                                    nprocs=WORLD, join=True)
    assert "signal" in str(failure.value).lower() or "exit" in str(failure.value).lower(), failure.value
    return folder, [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
def test_sharded_mmd_equals_the_dense_single_process_value(two_ranks):
    from ipmcondense.ipm import mmd2

    _, ranks = two_ranks
    for (estimator, backend), value in ranks[0]["mmd2"].items():
        dense = float(mmd2(X_ALL, Y_ALL, estimator=estimator, backend="dense", bandwidth=1.5))
        assert value == pytest.approx(dense, abs=1e-10, rel=0), (estimator, backend)
        assert ranks[1]["mmd2"][(estimator, backend)] == value
    # shards from a DistributedSampler (60 rows: no padding), median bandwidth of the pooled gathered sample
    assert ranks[0]["mmd2_median_sampler"] == pytest.approx(float(mmd2(X_ALL[:60], Y_ALL, estimator="biased")),
                                                            abs=1e-10, rel=0)


@pytest.mark.slow
def test_distance_command_in_a_job_prints_the_one_process_value_once(two_ranks):
    from ipmcondense.ipm import mmd2

    _, ranks = two_ranks
    assert ranks[1]["distance_cli"] == ""
    result = json.loads(ranks[0]["distance_cli"])
    assert result["settings"]["processes"] == WORLD and (result["n_a"], result["n_b"]) == (61, 47)
    assert result["value"] == pytest.approx(float(mmd2(X_ALL, Y_ALL)), abs=1e-10, rel=0)


@pytest.mark.slow
def test_sharded_mean_embedding_and_streaming_equal_the_in_memory_mean(two_ranks):
    from ipmcondense.ipm import mean_embedding_distance

    _, ranks = two_ranks
    expected = float(mean_embedding_distance(X_ALL, Y_ALL, feature_map=torch.tanh))
    assert ranks[0]["mean_embedding"] == pytest.approx(expected, abs=1e-12, rel=0)
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["stream"], X_ALL.mean(0), atol=1e-14, rtol=0)
    # one process, no group: the stream alone
    mean, n = distributed_free_stream()
    assert n == 61
    torch.testing.assert_close(mean, X_ALL.mean(0), atol=1e-14, rtol=0)


def distributed_free_stream():
    from ipmcondense.ipm.sharded import streaming_mean_embedding

    return streaming_mean_embedding(torch.utils.data.DataLoader(_Stream(0, 1), batch_size=None))


@pytest.mark.slow
def test_parallel_evaluation_gives_the_serial_accuracies(two_ranks):
    _, ranks = two_ranks
    torch.set_num_threads(1)
    serial = _evaluate(spread=False)
    assert ranks[0]["evaluation"] == serial
    assert ranks[1]["evaluation"] == serial


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dm", "dc", "sliced"])
def test_class_parallel_condensation_equals_one_process_bit_for_bit(two_ranks, method):
    """``sliced``: each rank draws and drops the other classes' projection seeds, so its classes get the
    projections one process gives them and the networks stay the same on every rank."""
    from ipmcondense.condensation.api import condense

    torch.set_num_threads(1)
    _, ranks = two_ranks
    if method == "dm":
        single = condense("dm", "digits", ipc=2, **TINY).images
    elif method == "sliced":
        single = condense("dm", "digits", ipc=2, discrepancy="sliced", n_projections=16, **TINY).images
    else:
        single = condense("dc", "digits", ipc=1, **DC).images
    assert torch.equal(ranks[0][method], ranks[1][method])
    assert torch.equal(ranks[0][method], single)


@pytest.mark.slow
def test_class_parallel_idm_keeps_one_pool_and_equals_one_process(two_ranks, tmp_path):
    """IDM's pool (seeded alike, trained on every class's rows with the gradients summed over the ranks, its
    accuracy meters counting every rank's hits) stays that of one process: same set up to float32 rounding."""
    from ipmcondense.condensation.api import condense

    torch.set_num_threads(1)
    folder, ranks = two_ranks
    single = condense("idm", "digits", ipc=2, out=tmp_path / "idm", **IDM).images
    assert torch.equal(ranks[0]["idm"], ranks[1]["idm"])
    assert (ranks[0]["idm"] - single).abs().max() <= 1e-6 * single.abs().max()
    # the checkpoint holds the one pool: the same networks (to rounding) and the same accuracy counts
    pool = torch.load(folder / f"idm-{WORLD}" / "checkpoint.pt", weights_only=False)["sampler"]
    one = torch.load(tmp_path / "idm" / "checkpoint.pt", weights_only=False)["sampler"]
    assert pool["iteration"] == one["iteration"] and pool["meters"] == one["meters"]
    assert sum(seen for _, seen in one["meters"]) == 3 * 2 * 2 * 40  # every rank's rows were counted
    assert len(pool["networks"]) == len(one["networks"]) == 3
    for mine, theirs in zip(pool["networks"], one["networks"]):  # measured: at most 3.7e-6 (one conv layer of
        for key in theirs:  # one network; the 4 SGD steps moved the weights by ~1e-3, half of which is missing
            assert torch.allclose(mine[key], theirs[key], rtol=0, atol=2e-5), key  # if a rank kept its own gradient
    start = condense("idm", "digits", ipc=2, **{**IDM, "iterations": 0}).images
    assert (single - start).abs().max() > 1e-2  # the three image steps moved the set (the test can fail)


def test_class_parallel_mtt_unroll_equals_one_process_in_float64(two_ranks):
    """The student's steps sum the ranks' own-row gradients and the reverse pass their Hessian-vector products:
    in float64 the loss, the step size's gradient and the images' gradient (each rank's own rows, zero
    elsewhere) equal the one-process unroll, full-batch and mini-batch, full graph and memory-lean."""
    _, ranks = two_ranks
    torch.set_num_threads(1)
    labels = _unroll_problem()[4]
    for case in UNROLLS:
        loss, images_grad, lr_grad = _unroll_gradients(None, *case)
        assert float(images_grad.abs().max()) > 1e-4, case
        for rank, result in enumerate(ranks):
            assert float(result["unroll"][case][0]) == pytest.approx(float(loss), abs=1e-12), case
            assert torch.allclose(result["unroll"][case][2], lr_grad, rtol=0, atol=1e-12), case
            others = (labels < 2 * rank) | (labels >= 2 * rank + 2)
            assert torch.equal(result["unroll"][case][1][others], torch.zeros_like(images_grad[others])), case
        summed = ranks[0]["unroll"][case][1] + ranks[1]["unroll"][case][1]
        assert torch.allclose(summed, images_grad, rtol=0, atol=1e-14), case


@pytest.mark.slow
def test_class_parallel_mtt_equals_one_process_within_the_stated_tolerance(two_ranks):
    from ipmcondense.condensation.api import condense

    torch.set_num_threads(1)
    folder, ranks = two_ranks
    single = condense("mtt", "digits", ipc=2, experts=str(folder / "experts"), memory_lean=True, **MTT)
    images, learning_rate, losses = ranks[0]["mtt"]
    assert torch.equal(images, ranks[1]["mtt"][0]) and learning_rate == ranks[1]["mtt"][1]
    assert (images - single.images).abs().max() <= MTT_RELATIVE_TOLERANCE * single.images.abs().max()
    assert learning_rate == pytest.approx(single.learning_rate, rel=1e-5)
    assert losses == pytest.approx(single.metrics["loss_history"], rel=1e-4)  # the replicated loss, not a sum of W copies
    start = condense("mtt", "digits", ipc=2, experts=str(folder / "experts"), **{**MTT, "iterations": 0}).images
    assert (single.images - start).abs().max() > 100 * MTT_RELATIVE_TOLERANCE * single.images.abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COUPLED))
def test_class_parallel_coupled_rows_equal_one_process_within_the_stated_tolerance(two_ranks, name, tmp_path):
    """KIP, RFAD, DD, ESP, RCIG (the inner problem on the whole S on every rank, the real loss split by class,
    S's gradient and the replicated parameters' gradients summed over the ranks), MTT with soft labels (the
    label rows exchanged like the image rows), DCC (the class sums of its joint gradients all-reduced), IDC
    (its pool's per-sample augmentations drawn for the whole batch), HaBa (the hallucinators' gradients
    summed, the club term and extractor on the whole bases), CAFE (every prototype gathered), LCMat (the
    perturbation's gap gradient summed), GLaD / IT-GAN (latent rows by class block, the anchor term a share),
    WMDD (the teacher's gradients summed, the barycenter draws of every class made, the terms as shares),
    channel_efficient (stored tensors by class block) and DCGM (the generator's and discriminator's gradients
    summed, every synthetic class centre gathered, the terms as shares): the run's checkpoint (rank 0's, every
    rank's rows merged) holds the one-process images, learned label rows, step sizes / temperature, helper
    networks and loss history, to the stated tolerance."""
    from ipmcondense.condensation.api import condense

    torch.set_num_threads(1)
    folder, _ = two_ranks
    method, options = COUPLED[name]
    options = _coupled(method, options, folder)
    result = condense(method, "digits", out=tmp_path / "one", **options)
    mine = torch.load(folder / f"{name}-{WORLD}" / "checkpoint.pt", weights_only=False)
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    assert mine["world_size"] == WORLD and mine["iteration"] == one["iteration"] == options["iterations"]
    learned = [(f"synthetic.{k}", v, mine["synthetic"][k]) for k, v in one["synthetic"].items() if v.is_floating_point()]
    learned += [(f"objective.{k}", v, mine["objective"][k]) for k, v in one["objective"].items()
                if isinstance(v, torch.Tensor) and v.is_floating_point()]
    extractor = one["decoder_training"].get("extractor", {})  # HaBa's adversary, trained on the whole bases
    # or DCGM's discriminator (trained replicated) and its generator (learned, replicated)
    extractor = extractor or one["decoder_training"].get("discriminator", {})
    kind = "extractor" if "extractor" in one["decoder_training"] else "discriminator"
    learned += [(f"extractor.{k}", v, mine["decoder_training"][kind][k]) for k, v in extractor.items()
                if v.is_floating_point()]
    assert bool(extractor) == (method in ("haba", "dcgm"))
    generator = {k: v for k, v in one["synthetic"].items() if k.startswith("decoder.") and v.is_floating_point()}
    assert {"synthetic.pixels", "synthetic.stored", "synthetic.bases", "synthetic.latents"} & {key for key, _, _ in learned}
    for key, theirs, ours in learned:
        error = float((ours - theirs).abs().max())
        if key == "objective.pool_params":  # RCIG's pool, trained online on S by Adam: an element whose gradient is
            # at rounding level can flip its step's sign, 2 x rcig_online_lr (5e-5) per step (measured 2e-4)
            assert error <= 10 * 5e-5, key
        elif key.startswith("objective.pool_exp_avg"):
            assert error <= 1e-3 * float(theirs.abs().max()), key
        elif key.startswith("extractor."):  # relative to the network's largest weight (its norm biases are ~1e-5)
            assert error <= COUPLED_RELATIVE_TOLERANCE * max(float(v.abs().max()) for v in extractor.values()), key
        elif key.startswith("synthetic.decoder."):  # DCGM's learned generator: relative to its largest weight
            assert error <= COUPLED_RELATIVE_TOLERANCE * max(float(v.abs().max()) for v in generator.values()), key
        else:
            assert error <= COUPLED_RELATIVE_TOLERANCE * float(theirs.abs().max()), key
    assert mine["history"]["losses"] == pytest.approx(one["history"]["losses"], rel=1e-5)
    # the optimiser's buffers (Adam moments / momenta of the merged rows, replicated parameters) agree too
    for index, state in one["optimizer"]["state"].items():
        for key, theirs in state.items():
            if isinstance(theirs, torch.Tensor) and theirs.numel() > 1:
                ours = mine["optimizer"]["state"][index][key]
                assert float((ours - theirs).abs().max()) <= 1e-3 * float(theirs.abs().max()) + 1e-12, (index, key)
    teacher = [one["sampler"]["network"]] if one["sampler"].get("network") else []  # WMDD's, trained on every class
    assert bool(teacher) == (method == "wmdd")
    for ours, theirs in zip(mine["sampler"].get("networks", [mine["sampler"].get("network")]),
                            one["sampler"].get("networks", teacher)):
        for key in theirs:  # a pool of networks trained on real data (IDC, IDM): the same networks, to rounding
            assert torch.allclose(ours[key], theirs[key], rtol=0, atol=2e-5), key
    # the steps moved the set far beyond the tolerance (the comparison can fail)
    start = condense(method, "digits", **{**options, "iterations": 0}).images
    moved = float((result.images - start).abs().max())
    assert moved > 50 * COUPLED_RELATIVE_TOLERANCE * float(start.abs().max()), moved


@pytest.mark.slow
def test_class_parallel_dream_batches_equal_one_process_and_checkpoint_in_its_format(two_ranks, tmp_path):
    """DREAM's k-means runs on each class's owner with the seed one process draws for that class: same set bit
    for bit (DC, class_batching's ~1e-7 aside at IPC 1: none), and the checkpointed picks (exchanged between
    the ranks) equal the one-process picks."""
    from ipmcondense.condensation.api import condense

    torch.set_num_threads(1)
    folder, ranks = two_ranks
    single = condense("dc", "digits", ipc=1, real_batches="dream", out=tmp_path / "dream", **DREAM)
    assert torch.equal(ranks[0]["dream"], ranks[1]["dream"])
    assert torch.equal(ranks[0]["dream"], single.images)
    mine = torch.load(folder / f"dream-{WORLD}" / "checkpoint.pt", weights_only=False)["real_batches"]["cache"]
    theirs = torch.load(tmp_path / "dream" / "checkpoint.pt", weights_only=False)["real_batches"]["cache"]
    assert set(mine) == set(theirs) == {4}
    assert torch.equal(mine[4]["indices"], theirs[4]["indices"]) and mine[4]["age"] == theirs[4]["age"]
    assert mine[4]["indices"].numel() == 40


@pytest.mark.slow
def test_resume_after_a_rank_was_killed_with_torchrun(two_ranks):
    """The checkpoint of iteration 1 (rank 0 wrote it, merged) is continued by ``torchrun`` to the single-process result."""
    from ipmcondense.condensation.api import condense

    folder, _ = two_ranks
    run = folder / "killed"
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    assert checkpoint["iteration"] == 1 and checkpoint["world_size"] == WORLD
    assert not (run / "synthetic.pt").exists()
    # a different number of processes is refused, naming the one to use
    with pytest.raises(ValueError, match="--nproc_per_node 2"):
        condense("dm", "digits", ipc=1, out=run, resume=True, **KILLED, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
               "-m", "ipmcondense", "condense", "--method", "dm", "--dataset", "digits", "--ipc", "1",
               "--iterations", "2", "--checkpoint-every", "1", "--seed", "3", "--out", str(run), "--resume",
               "--no-progress"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, done.stdout  # rank 0 prints, rank 1 does not
    assert json.loads(summaries[0])["iterations"] == 2
    metrics = json.loads((run / "metrics.json").read_text())
    # it continued the killed run: the first iteration's time is the one the killed run measured
    assert metrics["iteration_seconds"][0] == checkpoint["history"]["iteration_seconds"][0]
    assert metrics["processes"] == WORLD
    resumed = torch.load(run / "synthetic.pt", weights_only=False)["images"]
    torch.set_num_threads(1)
    single = condense("dm", "digits", ipc=1, **KILLED, progress=False).images
    assert torch.equal(resumed, single)


def test_class_blocks_and_unsupported_recipes():
    assert [list(distributed.classes_of_rank(10, r, 3)) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [distributed.items_of_rank(5, r, 2) for r in range(2)] == [[0, 2, 4], [1, 3]]
    with pytest.raises(ValueError, match="11 ranks for 10 classes"):
        distributed.classes_of_rank(10, 0, 11)
    from ipmcondense.condensation.parallel import check_class_parallel
    from ipmcondense.condensation.recipes import RECIPES, compose_recipe
    from ipmcondense.nets import get_network

    net = get_network("convnet", 1, 10, (8, 8))
    from ipmcondense.condensation.parallel import UNSUPPORTED_REASONS

    assert UNSUPPORTED_REASONS == {}  # every registered row runs class-parallel (the axes below are refused)
    for name in ("dm", "m3d", "dc", "dsa", "datadam", "wasserstein", "mtt", "kip", "rfad", "dd", "esp", "rcig",
                 "dcc", "idc", "haba", "cafe", "lcmat", "glad", "itgan", "wmdd", "channel_efficient", "dcgm"):
        check_class_parallel(RECIPES[name], {"arch": "convnet"}, net, 2, 10)
    check_class_parallel(RECIPES["mtt"], {"arch": "convnet", "soft_labels": True}, net, 2, 10)
    with pytest.raises(ValueError, match="are per-rank shares, its joint discrepancy the same on every rank"):
        check_class_parallel(compose_recipe("idm", feature_map="gradients", discrepancy="gradient_cosine_joint"),
                             {"arch": "convnet", "pool_augment": False}, net, 2, 10)
    check_class_parallel(compose_recipe("dc", real_batches="dream"), {"arch": "convnet"}, net, 2, 10)
    check_class_parallel(compose_recipe("dm", discrepancy="sliced"), {"arch": "convnet"}, net, 2, 10)
    check_class_parallel(compose_recipe("dm", discrepancy="w2_barycenter"), {"arch": "convnet"}, net, 2, 10)
    check_class_parallel(RECIPES["idm"], {"arch": "convnet", "pool_augment": False}, net, 2, 10)
    check_class_parallel(RECIPES["idm"], {"arch": "convnet", "pool_augment": True}, net, 2, 10)
    check_class_parallel(compose_recipe("dm", synthetic="channelwise"), {"arch": "convnet"}, net, 2, 10)
    check_class_parallel(compose_recipe("dm", synthetic="latent_gan"), {"arch": "convnet"}, net, 2, 10)
    with pytest.raises(ValueError, match="synthetic 'multiformation' is not class-blocked pixels"):
        check_class_parallel(compose_recipe("kip", synthetic="multiformation"), {"arch": "convnet"}, net, 2, 10)
    bn = get_network("convnet-bn", 1, 10, (8, 8))
    with pytest.raises(ValueError, match="batch normalisation"):
        check_class_parallel(RECIPES["dm"], {"arch": "convnet-bn"}, bn, 2, 10)


def test_without_a_process_group_everything_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init_from_env() == distributed.WorldInfo(0, 1, 0)
    assert not distributed.is_active() and distributed.world_size() == 1 and distributed.is_rank_zero()
    assert distributed.all_reduce_float64(torch.tensor([1.5], dtype=torch.float32)).dtype == torch.float64
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK=2 and WORLD_SIZE=2"):
        distributed.world_from_env()


def test_a_class_shard_draws_real_batches_and_augmentations_as_one_process_does():
    """The invariant behind bit-for-bit equality: a rank consumes the run's generator exactly as one process."""
    from ipmcondense.augment import DifferentiableSiameseAugmentation
    from ipmcondense.condensation.matching import siamese_augment
    from ipmcondense.condensation.parallel import ClassShardRealBatches
    from ipmcondense.data import ClassBalancedSampler

    labels = torch.arange(5).repeat_interleave(torch.tensor([7, 4, 9, 3, 6]))
    images = torch.randn(labels.numel(), 1, 6, 6, generator=torch.Generator().manual_seed(0))
    full_generator, shard_generator = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    full = ClassBalancedSampler(images, labels, 5, full_generator)
    shard = ClassShardRealBatches(images, labels, 5, shard_generator, range(2, 4))
    assert shard.images.shape[0] == 9 + 3  # only its classes' images are kept
    augmentation = DifferentiableSiameseAugmentation()
    for n in (2, 5):
        real, real_labels = full.sample(n)
        own_real, own_labels = shard.sample(n)
        keep = (real_labels >= 2) & (real_labels < 4)
        assert torch.equal(own_real, real[keep]) and torch.equal(own_labels, real_labels[keep])
        syn_labels = torch.arange(5).repeat_interleave(2)
        syn = torch.randn(10, 1, 6, 6)
        a_real, a_syn = siamese_augment(augmentation, real, real_labels, syn, syn_labels, full_generator)
        own_syn = (syn_labels >= 2) & (syn_labels < 4)
        b_real, b_syn = siamese_augment(augmentation, own_real, own_labels, syn[own_syn], syn_labels[own_syn],
                                        shard_generator, draw_for=range(5))
        assert torch.equal(b_real, a_real[keep]) and torch.equal(b_syn, a_syn[own_syn])
        assert torch.equal(full_generator.get_state(), shard_generator.get_state())


def test_a_class_shard_augments_its_rows_of_a_pool_batch_as_one_process_does():
    """``pool_augment``: the per-sample DSA draws are made for the whole class-balanced batch; a rank's rows get
    exactly the transforms one process applies to them (every family), and the generator advances alike."""
    from ipmcondense.augment import DifferentiableSiameseAugmentation
    from ipmcondense.condensation.parallel import ClassShard, ClassShardRealBatches
    from ipmcondense.data import ClassBalancedSampler

    labels = torch.arange(5).repeat_interleave(torch.tensor([7, 4, 9, 3, 6]))
    images = torch.randn(labels.numel(), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    shard = ClassShard(range(2, 4), 5, 2)
    augmentation = DifferentiableSiameseAugmentation()
    full_generator, shard_generator = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    full = ClassBalancedSampler(images, labels, 5, full_generator)
    own = ClassShardRealBatches(images, labels, 5, shard_generator, range(2, 4))
    augment = shard.own_rows_of_whole_batch_augmentation(augmentation, own.counts, 4)
    families = set()
    for _ in range(12):
        real, real_labels = full.sample(4)
        state = full_generator.get_state()
        families.add(augmentation._choose_family(torch.Generator().set_state(state)))
        expected = augmentation(real, generator=full_generator)
        own_real, own_labels = own.sample(4)
        keep = (real_labels >= 2) & (real_labels < 4)
        assert torch.equal(augment(own_real, generator=shard_generator), expected[keep])
        assert torch.equal(full_generator.get_state(), shard_generator.get_state())
    assert len(families) >= 3  # several transform families were exercised
    assert torch.equal(shard.row_labels(torch.zeros(10, 3), torch.arange(5).repeat_interleave(8)),
                       torch.arange(5).repeat_interleave(2))  # multi-formation: 2 stored rows per class


def test_a_class_shard_draws_dream_batches_as_one_process_does():
    """DREAM's per-class k-means on the owner, the seeds of every class drawn in class order: the own classes'
    representatives (and the generator) equal one process's; a one-process checkpoint of the picks loads as
    the own classes' picks."""
    from ipmcondense.condensation.parallel import ClassShardDreamBatches
    from ipmcondense.condensation.real_batches import DreamRealBatches

    labels = torch.arange(5).repeat_interleave(torch.tensor([7, 4, 9, 3, 6]))
    images = torch.randn(labels.numel(), 1, 6, 6, generator=torch.Generator().manual_seed(0))
    full_generator, shard_generator = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    full = DreamRealBatches(images, labels, 5, full_generator, interval=2, max_iter=10)
    shard = ClassShardDreamBatches(images, labels, 5, shard_generator, range(1, 4), interval=2, max_iter=10)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))
    for sampler in (full, shard):
        sampler.observe([net])
    keep = (labels >= 1) & (labels < 4)
    with pytest.warns(UserWarning, match="class 3 has 3 training images"):
        for step in range(5):  # fresh k-means at steps 0, 2 and 4 (interval 2)
            real, real_labels = full.sample(3)
            own_real, own_labels = shard.sample(3)
            mine = (real_labels >= 1) & (real_labels < 4)
            assert torch.equal(own_real, real[mine]) and torch.equal(own_labels, real_labels[mine]), step
            assert torch.equal(full_generator.get_state(), shard_generator.get_state()), step
    state = full.state_dict()
    own_global = state["cache"][3]["indices"][keep[state["cache"][3]["indices"]]]
    assert torch.equal(shard.state_dict()["cache"][3]["indices"], own_global)  # one process: its own picks
    restored = ClassShardDreamBatches(images, labels, 5, torch.Generator(), range(1, 4), interval=2, max_iter=10)
    restored.load_state_dict(state)
    assert torch.equal(restored.sample(3)[0], shard.sample(3)[0])


def test_a_dropped_barycenter_call_draws_what_the_call_draws():
    """WMDD class-parallel: a rank drops another class's barycenter call by drawing the permutation of that class's
    real rows; the generator then stands where one call on those rows leaves it (and not for another row count)."""
    from ipmcondense.condensation.discrepancies import BarycenterDiscrepancy

    barycenter = BarycenterDiscrepancy(2)
    real, synthetic = torch.randn(7, 3, generator=torch.Generator().manual_seed(1)), torch.randn(2, 3)
    called = torch.Generator().manual_seed(0)
    barycenter(real, synthetic, generator=called)
    for rows in (6, 7, 8):
        dropped = torch.Generator().manual_seed(0)
        barycenter.drop_draws(dropped, rows)
        assert torch.equal(dropped.get_state(), called.get_state()) == (rows == 7), rows
