"""Mixtures in tokens (issue 21): `mixer.unit=token` weights are shares of label tokens, `unit=sample` shares of
samples. The sampler turns token shares into draw probabilities with each domain's mean label tokens per sample."""
import pytest
import torch

from dataflex.core.sampler import DataAwareSampler
from dataflex.core.settings import check_settings, parameters
from dataflex.data.mixture import MixtureDataset
from dataflex.data.samples import chunk_documents
from dataflex.mixers import DoReMiMixer, StaticMixer
from dataflex.session.flex import DataFlex
from dataflex.utils.errors import ConfigError

SEQ, ROWS, WEIGHTS = 128, 32, [0.5, 0.3, 0.2]


def unequal_domains(n_docs=300, seed=0):
    """Three domains whose samples differ in length: short (4..24 labels), long (40..128) and a mix."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (lo, hi) in {"short": (5, 25), "long": (41, 129), "mixed": (5, 129)}.items():
        docs = [(f"{name}{i}", torch.randint(1, 60, (int(torch.randint(lo, hi + 1, (1,), generator=g)),),
                                             generator=g).tolist()) for i in range(n_docs)]
        out[name] = chunk_documents(docs, SEQ, 0)
    return out


def run(unit, steps=200, packing=True, apply="sample"):
    """`steps` steps of a static mixture without a model: every token's loss is synthetic (1 + its domain)."""
    flex = DataFlex(unequal_domains(), global_batch_size=ROWS, packing=packing,
                    plugins=[StaticMixer(weights=WEIGHTS, unit=unit, apply=apply)])
    tokens, samples = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for _ in range(steps):
        batch = flex.next_batch()
        flex.loss.from_token_loss(torch.ones(batch["labels"].shape) + 0.0, batch)
        rec = flex.end_step()
        tokens += torch.tensor([rec["domain_tokens"][d] for d in flex.data.names], dtype=torch.float64)
        samples += torch.bincount(flex.state.batch_domains, minlength=3).double()
    return flex, tokens / tokens.sum(), samples / samples.sum()


def test_token_unit_achieves_each_domains_token_share_within_one_percent():
    flex, token_share, _ = run("token")
    target = torch.tensor(WEIGHTS, dtype=torch.float64)
    assert (token_share - target).abs().max() < 0.01, token_share.tolist()
    shares = flex.token_shares()                        # what summary.json reports
    assert shares["unit"] == "token"
    assert [shares["target"][d] for d in flex.data.names] == pytest.approx(WEIGHTS, abs=1e-9)
    assert [shares["achieved"][d] for d in flex.data.names] == pytest.approx(token_share.tolist(), abs=1e-9)
    mean = flex.sampler.mean_tokens()
    assert mean[0] < 20 < 60 < mean[1]                  # the domains differ in length, so the unit matters
    draw = flex.sampler.weights
    assert torch.allclose(draw, (target / mean) / (target / mean).sum())


def test_sample_unit_keeps_sample_shares_and_tokens_follow_lengths():
    flex, token_share, sample_share = run("sample")
    target = torch.tensor(WEIGHTS, dtype=torch.float64)
    assert (sample_share - target).abs().max() < 0.01, sample_share.tolist()
    assert (token_share - target).abs().max() > 0.1     # short samples: far fewer tokens than samples
    shares = flex.token_shares()
    assert shares["unit"] == "sample"
    expected = target * flex.sampler.mean_tokens()
    assert [shares["target"][d] for d in flex.data.names] == pytest.approx((expected / expected.sum()).tolist())
    assert [shares["achieved"][d] for d in flex.data.names] == pytest.approx(token_share.tolist(), abs=1e-9)


def test_unit_defaults_to_token_under_packing_and_sample_on_padded_rows():
    for packing, unit in ((True, "token"), (False, "sample")):
        flex = DataFlex(unequal_domains(n_docs=20), global_batch_size=4, packing=packing,
                        plugins=[StaticMixer(weights=WEIGHTS)])
        flex.next_batch()
        assert flex.state.weight_unit == flex.sampler.unit == unit
        assert flex.state.domain_weights.tolist() == pytest.approx(WEIGHTS)      # the record's domain_weights


def test_size_weights_and_loss_weights_count_tokens_under_the_token_unit():
    # weights="size" is the data eaten whole in either unit: the same draws
    draws = {}
    for unit in ("token", "sample"):
        flex = DataFlex(unequal_domains(n_docs=20), global_batch_size=4, packing=True,
                        plugins=[StaticMixer(weights="size", unit=unit)])
        flex.next_batch()
        draws[unit] = flex.sampler.weights
    assert torch.allclose(draws["token"], draws["sample"])
    # apply=loss: q (the sizes) and w in the same unit, so w / q weighs each domain's tokens to w's token shares
    flex = DataFlex(unequal_domains(n_docs=20), global_batch_size=4, packing=True,
                    plugins=[StaticMixer(weights=WEIGHTS, unit="token", apply="loss")])
    flex.next_batch()
    mean = flex.sampler.mean_tokens()
    q_tokens = torch.tensor(flex.data.sizes, dtype=torch.float64) * mean
    q_tokens = q_tokens / q_tokens.sum()
    assert torch.allclose(flex.sampler.token_shares(), q_tokens)
    assert torch.allclose(flex.state.domain_loss_weights, torch.tensor(WEIGHTS, dtype=torch.float64) / q_tokens)


def test_unit_is_a_setting_of_every_mixer():
    check_settings(StaticMixer, {"unit": "token"}, "mixer")
    check_settings(StaticMixer, {"unit": "sample", "apply": "loss"}, "mixer")
    with pytest.raises(ConfigError, match=r"mixer.unit=tokens: expected one of token, sample"):
        check_settings(StaticMixer, {"unit": "tokens"}, "mixer")
    assert "unit" in parameters(DoReMiMixer) and "apply" in parameters(DoReMiMixer)
    with pytest.raises(ValueError, match="mixer.unit"):
        StaticMixer(unit="row")
    assert DoReMiMixer(reference="x", unit="sample").unit == "sample"
    assert DoReMiMixer(reference="x").apply_to == "loss"        # its own default survives the added settings


def test_sampler_token_weights_follow_pool_masks_and_resume():
    data = MixtureDataset(unequal_domains(n_docs=20))
    s = DataAwareSampler(data.sizes, seed=3, lengths=data.lengths)
    s.set_weights([1, 1, 1], unit="token")
    before = s.weights.clone()
    mask = torch.zeros(data.sizes[1], dtype=torch.bool)
    mask[torch.from_numpy(data.lengths(data.offsets[1] + torch.arange(data.sizes[1])) < 64)] = True
    s.set_pool(masks={1: mask})                         # the long domain keeps its shorter samples only
    assert s.mean_tokens()[1] < 64 and s.weights[1] > before[1]
    assert torch.allclose(s.token_shares(), torch.full((3,), 1 / 3, dtype=torch.float64))
    other = DataAwareSampler(data.sizes, seed=3, lengths=data.lengths)
    other.load_state_dict(s.state_dict())
    assert other.unit == "token" and torch.equal(other.target, s.target) and torch.equal(other.weights, s.weights)
    assert torch.equal(other.draw(50), s.draw(50))
    with pytest.raises(ValueError, match="lengths"):
        DataAwareSampler(data.sizes).set_weights([1, 1, 1], unit="token")


def test_bandit_under_the_token_unit_weighs_rewards_by_the_draw_probabilities(monkeypatch):
    import dataflex.mixers.bandit as bandit

    seen = []
    estimate = bandit.exp3_estimate
    monkeypatch.setattr(bandit, "exp3_estimate", lambda r, c, probs, e: seen.append(probs.clone()) or estimate(r, c, probs, e))
    flex = DataFlex(unequal_domains(n_docs=40), global_batch_size=8, packing=True, plugins=[bandit.BanditMixer()])
    for _ in range(3):
        batch = flex.next_batch()
        flex.loss.from_token_loss(torch.ones(batch["labels"].shape), batch)
        flex.end_step()
    mixer = flex.engine.of("mixer")
    assert len(seen) == 3 and torch.equal(seen[-1], flex.sampler.weights)
    pi = mixer.policy / flex.sampler.mean_tokens()
    assert torch.allclose(flex.sampler.weights, pi / pi.sum())         # drawn with pi_i / L_i
