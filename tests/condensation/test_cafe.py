"""CAFE as kaiwang960112/CAFE distill.py: the accuracy-watched loops and the layer-wise loss with the pooled
embedding matched twice (f4 and its flatten f5)."""

import torch
import torch.nn.functional as F

from ipmcondense.condensation import samplers
from ipmcondense.condensation.matching import build_discrepancy, build_extra_terms, build_feature_map, matching_loss
from ipmcondense.condensation.recipes import get_recipe, resolve_config
from ipmcondense.condensation.samplers import AccuracyWatchedSampler, SamplerContext, get_sampler
from ipmcondense.nets import build_isolated, get_network


def _reference_watch(accuracies, window, stop):
    """distill.py's acc_watcher, written out: the number of checks until ``stop(spread)`` holds for a full window."""
    watcher, acc = [], 0.0
    for k, per_class in enumerate(accuracies, start=1):
        acc += sum(per_class)  # acc_test += (...).mean() for every class
        acc /= len(per_class)  # acc_test /= num_classes
        watcher.append(acc)
        if len(watcher) == window:
            if stop(max(watcher) - min(watcher)):
                return k
            watcher.pop(0)
    return None


def _ctx():
    images = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(3).repeat_interleave(2)

    class _Batches:
        def sample(self, n):
            return images, labels

    return SamplerContext(build_network=lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)),
                          device=torch.device("cpu"),
                          generator=torch.Generator().manual_seed(1), real_batches=_Batches(),
                          augmentation=lambda x, generator=None: x, synthetic=lambda: (images, labels),
                          parameter_gradients=False)


def _scripted(monkeypatch, values):
    calls = iter(values)
    monkeypatch.setattr(samplers, "real_accuracy_per_class", lambda net, ctx, n: torch.tensor(next(calls)))


def test_the_image_steps_stop_when_the_running_accuracy_window_spreads_less_than_lambda_1(monkeypatch):
    # a constant accuracy 0.5 on 3 classes: CAFE's running value a_k = 0.5 + a_{k-1}/3 (0.5, 0.667, 0.722, ...)
    # still moves over the first two windows, so the loop ends at check 12, not 10 (a plain mean would stop at 10)
    script = [[0.5, 0.5, 0.5]] * 30
    expected = _reference_watch(script, 10, lambda spread: spread < 0.04)
    assert expected == 12
    _scripted(monkeypatch, script)
    sampler = get_sampler("fresh_watched", ipc=1)
    assert isinstance(sampler, AccuracyWatchedSampler)
    ctx = _ctx()
    nets = sampler.draw(ctx)
    steps = next(k for k in range(1, 100) if not sampler.keep_stepping(nets, ctx, k - 1))
    assert steps == expected


def test_the_network_trains_until_the_window_spreads_more_than_lambda_2(monkeypatch):
    script = [[0.2, 0.3, 0.1]] * 5 + [[0.2, 0.3, 0.2]] * 40
    expected = _reference_watch(script, 10, lambda spread: spread > 0.03)
    epochs = []
    _scripted(monkeypatch, script)
    sampler = get_sampler("fresh_watched", ipc=1, max_inner_epochs=60)
    ctx = _ctx()
    nets = sampler.draw(ctx)
    train = samplers._train_steps
    monkeypatch.setattr(samplers, "_train_steps", lambda *a: (epochs.append(1), train(*a)))
    before = [p.detach().clone() for p in nets[0].parameters()]
    sampler.between_steps(nets, ctx, 0)
    assert len(epochs) == expected == 10
    assert any(not torch.equal(p, q) for p, q in zip(before, nets[0].parameters()))
    # an accuracy that never moves: the library cap ends the loop (the reference would not end)
    epochs.clear()
    _scripted(monkeypatch, [[0.0, 0.0, 0.0]] * 10)
    capped = get_sampler("fresh_watched", ipc=1, max_inner_epochs=7)
    capped.between_steps(capped.draw(ctx), ctx, 0)
    assert len(epochs) == 7


def test_cafe_loss_matches_the_reference_formula_with_the_pooled_embedding_twice():
    config = resolve_config(get_recipe("cafe"), "mnist")
    recipe = get_recipe("cafe")
    net = build_isolated(lambda: get_network("convnet", 1, 10, (8, 8)), 0)  # three blocks, as CAFE's ConvNet
    g = torch.Generator().manual_seed(2)
    real, syn = torch.randn(20, 1, 8, 8, generator=g), torch.randn(10, 1, 8, 8, generator=g)
    rl, sl = torch.arange(10).repeat_interleave(2), torch.arange(10)
    got = matching_loss(net, build_feature_map(recipe, config), build_discrepancy(recipe, config), real, rl, syn, sl,
                        extra_terms=build_extra_terms(recipe, config)).total

    def criterion_middle(fr, fs):  # distill.py: per-class means, MSE with reduction 'sum'
        return F.mse_loss(fr.reshape(10, -1, *fr.shape[1:]).mean(1), fs.reshape(10, -1, *fs.shape[1:]).mean(1),
                          reduction="sum")

    with torch.no_grad():
        f1, f2, f3 = net.layer_features(real)
        s1, s2, s3 = net.layer_features(syn)
        f4, s4 = net.embed(real), net.embed(syn)  # pooled last map (flattened: the same numbers as f5)
        loss_middle = (0.1 * criterion_middle(f1, s1) + 0.1 * criterion_middle(f2, s2) + 1.0 * criterion_middle(f3, s3)
                       + 1.0 * criterion_middle(f4, s4))
        protos = s4.reshape(10, 1, -1).mean(1)
        loss_output = criterion_middle(s4, f4) + 0.01 * F.cross_entropy(f4 @ protos.T, rl, reduction="sum")
    torch.testing.assert_close(got.detach(), loss_middle + loss_output, rtol=1e-5, atol=1e-5)
