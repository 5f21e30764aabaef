"""bench/chunked_loss.py: the chunked loss equals the model's own loss and gradients, and an
in-backward optimizer still sees each parameter's whole gradient once (its output layer's
gradient arrives in several chunks, summed by autograd before the update hook)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bench.chunked_loss import chunked_lm_loss  # noqa: E402
from lomo_kernels import AdaLomo  # noqa: E402


def _model(tied: bool):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).float()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 13, 64])
def test_chunked_loss_equals_the_models_loss_and_gradients(tied, chunk):
    model = _model(tied)
    ids = torch.randint(0, 97, (3, 13), generator=torch.Generator().manual_seed(1))
    ref = model(input_ids=ids, labels=ids).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = chunked_lm_loss(model, ids, chunk)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_an_in_backward_update_with_the_chunked_loss_equals_the_full_loss():
    a, b = _model(False), None
    b = copy.deepcopy(a)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    opt_a, opt_b = AdaLomo(a, lr=1e-2, backend="torch"), AdaLomo(b, lr=1e-2,
                                                                    backend="torch")
    for _ in range(2):
        opt_a.fused_backward(a(input_ids=ids, labels=ids).loss, 1e-2)
        opt_b.fused_backward(chunked_lm_loss(b, ids, 4), 1e-2)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=n)


def test_a_bad_chunk_is_refused():
    with pytest.raises(ValueError, match="chunk must be a positive"):
        chunked_lm_loss(_model(False), torch.zeros((1, 4), dtype=torch.long), 0)
