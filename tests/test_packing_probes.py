"""Probes on packed rows: a probe's per-sample outputs (losses, token losses, embeddings, EL2N) from packed
rows equal those of the same samples run padded, one per row (the independent computation), and the session
packs its probes only where that takes fewer rows, returning results in the order asked."""
import pytest
import torch
from test_packing import SEQ, llama, packed_step, ragged_domains, tiny

from dataflex.data.mixture import MixtureDataset
from dataflex.grad.interface import PACKED_OUTPUTS, TorchInterface
from dataflex.session.flex import DataFlex
from dataflex.session.signals import pack_probe


@pytest.mark.parametrize("output", PACKED_OUTPUTS)
def test_packed_probe_equals_padded_probe_on_tinygpt(output):
    data, plan, batch = packed_step(seed=1)
    iface = TorchInterface(tiny(2))
    got, want = iface.probe(batch, output), iface.probe(data.batch(plan.ids), output)
    assert got.shape == want.shape and got.shape[0] == len(plan.ids) > len(batch["input_ids"])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_probe_equals_padded_probe_on_hf_llama(impl):
    data, plan, batch = packed_step(seed=2)
    iface = TorchInterface(llama(impl))
    for output in ("loss", "embedding"):
        torch.testing.assert_close(iface.probe(batch, output), iface.probe(data.batch(plan.ids), output),
                                   atol=2e-5, rtol=1e-5)


class Recording(TorchInterface):
    """A real TorchInterface that notes the shape of every batch it probes."""

    def __init__(self, module):
        super().__init__(module)
        self.shapes = []

    def probe(self, batch, output="loss"):
        self.shapes.append((tuple(batch["input_ids"].shape), "segment_ids" in batch))
        return super().probe(batch, output)


def test_session_probes_pack_chunks_and_keep_the_order_asked():
    data = MixtureDataset(ragged_domains(4))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(data), (40,), generator=g)
    ids[7] = ids[3]                                         # a sample asked twice
    results = {}
    for pack in (False, True):
        iface = Recording(tiny(3))
        flex = DataFlex(data, 4, interface=iface, packing=True,
                        probe_batch_size=16, pack_probes=pack)
        results[pack] = {o: flex.state.signals.probe(ids, o) for o in ("loss", "token_loss")}
        rows = [shape[0][0] for shape in iface.shapes]
        if pack:       # fewer rows than samples, every chunk packed
            assert all(packed for _, packed in iface.shapes) and sum(rows) < 2 * len(ids)
        else:
            assert not any(packed for _, packed in iface.shapes) and sum(rows) == 2 * len(ids)
    for o in ("loss", "token_loss"):
        torch.testing.assert_close(results[True][o], results[False][o], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(results[True]["loss"][7], results[True]["loss"][3], atol=2e-5, rtol=1e-5)


def test_chunks_of_full_length_samples_stay_padded():
    data = MixtureDataset(ragged_domains(0))
    full = torch.nonzero(torch.as_tensor(data.lengths(torch.arange(len(data)))) == SEQ).flatten()[:5]
    assert len(full) == 5 and pack_probe(data, full) is None
    order, batch = pack_probe(data, torch.arange(12))
    assert sorted(order.tolist()) == list(range(12)) and len(batch["input_ids"]) < 12
