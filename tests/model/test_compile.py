"""torch.compile sees the whole training forward as one graph: no graph breaks, no data-dependent shapes."""
import torch

from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM


def test_forward_and_sparse_loss_trace_as_one_graph_with_equal_results():
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(ModernBertConfig.preset("micro"))
    ids = torch.randint(5, 256, (256,))
    cu = torch.tensor([0, 100, 180, 256], dtype=torch.int32)
    labels = torch.where(torch.rand(256) < 0.3, ids, torch.full_like(ids, -100))
    num_masked = int((labels != -100).sum())
    # fullgraph=True raises on any graph break; the eager backend keeps the test fast (no code generation).
    traced = torch.compile(model, fullgraph=True, backend="eager")
    compiled_loss = traced(ids, cu, 100, labels=labels, num_masked=num_masked).loss
    eager_loss = model(ids, cu, 100, labels=labels, num_masked=num_masked).loss
    assert torch.equal(compiled_loss, eager_loss)
