"""The chunked CPU loss (nanochat.chunked_loss) against F.cross_entropy over the full softcapped logits."""
import pytest
import torch
import torch.nn.functional as F

from nanochat import chunked_loss
from nanochat.chunked_loss import softcapped_cross_entropy
from nanochat.gpt import SOFTCAP


def full_logits_loss(x, weight, targets, reduction):
    logits = SOFTCAP * torch.tanh((x @ weight.t()) / SOFTCAP)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)


def assert_grads_close(got, expected, name="", scale=None):
    # fp32 sums of hundreds of rows in a different order: tolerance relative to the gradients' scale
    scale = expected.abs().max().item() if scale is None else scale
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale, msg=name or None)


def make_inputs(rows=300, channels=24, vocab=97, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # large logits so the softcap's tanh saturates for some entries (its derivative matters)
    x = (4 * torch.randn(rows, channels, generator=gen)).requires_grad_()
    weight = torch.randn(vocab, channels, generator=gen).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[::7] = -1
    return x, weight, targets


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [64, 300, 1000])  # 64 does not divide 300: a short last chunk
def test_loss_and_gradients_match_full_logits(reduction, chunk_rows):
    x, weight, targets = make_inputs()
    expected = full_logits_loss(x, weight, targets, reduction)
    expected_grads = torch.autograd.grad(2.5 * expected, (x, weight))
    got = softcapped_cross_entropy(x, weight, targets, SOFTCAP, reduction, chunk_rows=chunk_rows)
    got_grads = torch.autograd.grad(2.5 * got, (x, weight))  # backward scales the gradients made in forward
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        assert_grads_close(g, e)


def test_compiled_elementwise_matches(monkeypatch):
    monkeypatch.setattr(chunked_loss, "COMPILE_ELEMENTWISE", True)
    x, weight, targets = make_inputs(rows=128)
    expected = full_logits_loss(x, weight, targets, "mean")
    expected_grads = torch.autograd.grad(expected, (x, weight))
    got = softcapped_cross_entropy(x, weight, targets, SOFTCAP, "mean", chunk_rows=64)
    got_grads = torch.autograd.grad(got, (x, weight))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        assert_grads_close(g, e)


def test_no_grad_per_row_losses():
    x, weight, targets = make_inputs()
    with torch.no_grad():
        expected = full_logits_loss(x, weight, targets, "none")
        got = softcapped_cross_entropy(x, weight, targets, SOFTCAP, "none", chunk_rows=64)
    assert got.shape == expected.shape == (300,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got[targets == -1] == 0).all()


def test_every_target_ignored_behaves_like_cross_entropy():
    x, weight, targets = make_inputs(rows=10)
    targets[:] = -1
    assert torch.isnan(softcapped_cross_entropy(x, weight, targets, SOFTCAP, "mean"))
    assert torch.isnan(full_logits_loss(x, weight, targets, "mean"))
    total = softcapped_cross_entropy(x, weight, targets, SOFTCAP, "sum")
    total.backward()
    assert total.item() == 0 and (x.grad == 0).all() and (weight.grad == 0).all()


def test_unreduced_loss_with_autograd_is_refused():
    x, weight, targets = make_inputs(rows=10)
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        softcapped_cross_entropy(x, weight, targets, SOFTCAP, "none")


def test_model_loss_and_gradients_match_the_full_logits_path(build_random_gpt):
    """GPT.forward's CPU training loss (chunked) == cross-entropy over its own full logits, weights' grads too."""
    model = build_random_gpt(seed=1, sequence_len=32, vocab_size=70).train()  # vocab padded to 128; every weight random
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 70, (3, 32), generator=gen)
    targets = torch.randint(0, 70, (3, 32), generator=gen)
    targets[1, 5:] = -1

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    for reduction in ("mean", "sum"):
        logits = model(idx)  # no targets: the full softcapped logits
        expected = F.cross_entropy(logits.view(-1, 70), targets.view(-1), ignore_index=-1, reduction=reduction)
        expected_grads = grads(expected)
        got = model(idx, targets, loss_reduction=reduction)
        got_grads = grads(got)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert got_grads.keys() == expected_grads.keys()
        scale = max(g.abs().max().item() for g in expected_grads.values())  # some grads are ~0 (resid_lambdas)
        for name in expected_grads:
            assert_grads_close(got_grads[name], expected_grads[name], name, scale)
    with torch.no_grad():
        per_token = model(idx, targets, loss_reduction="none")
        full = F.cross_entropy(model(idx).view(-1, 70), targets.view(-1), ignore_index=-1, reduction="none")
    torch.testing.assert_close(per_token, full, rtol=1e-5, atol=1e-5)
