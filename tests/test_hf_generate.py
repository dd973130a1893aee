"""`target.generate(..., custom_generate=speckv.assisted(draft, spec))`: lossless, honours generate()'s
length / EOS / sampling settings, and refuses what it cannot honour with a clear message."""

from __future__ import annotations

import pytest
import torch
from eval_synthetic import write_mlp_export
from speckv.profiling import invariant
from speckv.profiling.controllers import FixedGamma
from speckv.profiling.errors import SpeckvError
from speckv.profiling.models import load_model, load_pair
from tiny import perturbed_draft, tiny_target
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

import speckv
from speckv.hf import AssistedGenerate, GenerateError, assisted, detect_compression

CONTROLLERS = ["none", "fixed:1", "fixed:4", "heuristic", "threshold:0.4+trim", "entropy:1.5"]
PROMPTS = ["def add(a, b):", "The quick brown fox"]
N = 24


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return write_mlp_export(
        tmp_path_factory.mktemp("export") / "export", ("fp32", "int8", "nf4"), gamma_max=8
    )


@pytest.fixture(scope="module")
def small():
    target = tiny_target()
    return target, perturbed_draft(target, 0.04), torch.tensor([list(range(5, 25))])


def greedy(model, inputs, **kwargs) -> torch.Tensor:
    return model.generate(**inputs, do_sample=False, pad_token_id=0, **kwargs)


def test_public_name():
    assert speckv.assisted is assisted
    assert "assisted" in speckv.__all__


def check_greedy(tiny_pair_dir, compression: str, specs: list[str], prompts: list[str]) -> tuple[int, int]:
    """Each controller's output equals the target's own greedy generate(); (accepted, rejected) drafts."""
    pair = load_pair(*map(str, tiny_pair_dir), compression, "cpu")
    accepted = rejected = 0
    for prompt in prompts:
        inputs = pair.tokenizer(prompt, return_tensors="pt")  # input_ids + an all-ones attention mask
        expected = greedy(pair.target, inputs, max_new_tokens=N)
        for spec in specs:
            method = assisted(pair.draft, spec)
            out = pair.target.generate(**inputs, max_new_tokens=N, pad_token_id=0, custom_generate=method)
            assert torch.equal(out, expected), f"{compression} {spec} {prompt!r}"
            accepted += method.last_result.accepted
            rejected += method.last_result.drafted - method.last_result.accepted
            if spec.startswith("mlp:"):
                assert method.controller(compression).compression == compression  # the rule's own costs
    return accepted, rejected


@pytest.mark.parametrize("compression", ["fp32", "int8", "nf4"])
def test_greedy_equals_target_generate(tiny_pair_dir, export_dir, compression):
    """Every controller, the learned `mlp:` rule included, gives the target's own greedy output (~1-2 s per
    compression on an idle 2-core CPU)."""
    specs = [*CONTROLLERS, f"mlp:{export_dir}"]
    accepted, rejected = check_greedy(tiny_pair_dir, compression, specs, PROMPTS)
    assert accepted > 20 and rejected > 10  # both paths of the verify were exercised


@pytest.mark.parametrize("compression", ["int8", "nf4"])
def test_quantized_user_model_gets_rowwise_attention(tiny_pair_dir, compression):
    """A target loaded by the user (not load_pair) is detected as int8 / nf4 and made batch-invariant."""
    cpu = torch.device("cpu")
    target = load_model(str(tiny_pair_dir[0]), "target", cpu, compression)
    draft = load_model(str(tiny_pair_dir[1]), "draft", cpu)
    assert detect_compression(target) == compression
    assert target.config._attn_implementation != invariant.NAME
    seen = []

    class Recording(FixedGamma):
        def start_step(self, ctx):
            seen.append(ctx.compression)
            return super().start_step(ctx)

    method = assisted(draft, Recording(4))
    inputs = {"input_ids": torch.tensor([list(range(5, 25))])}
    first = target.generate(**inputs, max_new_tokens=N, custom_generate=method)
    assert target.config._attn_implementation == invariant.NAME
    second = target.generate(**inputs, max_new_tokens=N, custom_generate=method)  # installing is idempotent
    assert torch.equal(first, second)
    assert torch.equal(first, greedy(target, inputs, max_new_tokens=N))
    assert set(seen) == {compression}


def test_float_compressions(small):
    target, _, _ = small
    assert detect_compression(target) == "fp32"
    assert detect_compression(tiny_target().to(torch.bfloat16)) == "bf16"


def test_eos_and_length_settings(small):
    target, draft, ids = small
    free = greedy(target, {"input_ids": ids}, max_new_tokens=30)[0, ids.shape[1] :].tolist()
    eos = free[11]  # a token the target really emits, so generation stops mid-draft
    method = assisted(draft, "fixed:8")
    for kwargs in (
        {"max_new_tokens": 30, "eos_token_id": eos},
        {"max_new_tokens": 30, "eos_token_id": [127, eos]},
        {"max_length": ids.shape[1] + 9},  # max_length instead of max_new_tokens
        {"max_new_tokens": 1},
    ):
        expected = greedy(target, {"input_ids": ids}, **kwargs)
        assert torch.equal(target.generate(ids, custom_generate=method, **kwargs), expected), kwargs
    assert method.last_result.new_tokens == 1
    # the model's own generation_config EOS applies when generate() gets none
    own = tiny_target()
    own.generation_config.eos_token_id = eos
    expected = greedy(own, {"input_ids": ids}, max_new_tokens=30)
    assert expected[0, -1] == eos and expected.shape[1] < ids.shape[1] + 30
    assert torch.equal(own.generate(ids, max_new_tokens=30, custom_generate=method), expected)
    assert method.last_result.stop_reason == "eos"


def test_return_dict_in_generate(small):
    target, draft, ids = small
    out = target.generate(
        ids, max_new_tokens=12, return_dict_in_generate=True, custom_generate=assisted(draft)
    )
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert torch.equal(out.sequences, greedy(target, {"input_ids": ids}, max_new_tokens=12))
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)


def test_sampling_settings_reach_the_loop(small, monkeypatch):
    import speckv.hf

    target, draft, ids = small
    seen = []
    real = speckv.hf.speculative_generate
    monkeypatch.setattr(speckv.hf, "speculative_generate", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    target.generate(ids, max_new_tokens=5, do_sample=True, custom_generate=assisted(draft))
    target.generate(
        ids,
        max_new_tokens=5,
        do_sample=True,
        temperature=0.7,
        top_k=0,
        top_p=0.9,
        custom_generate=assisted(draft),
    )
    target.generate(
        ids, max_new_tokens=5, temperature=0.7, custom_generate=assisted(draft)
    )  # do_sample=False
    assert [(c.temperature, c.top_k, c.top_p) for c in seen] == [(1.0, 50, 1.0), (0.7, 0, 0.9), (0.0, 0, 1.0)]
    assert seen[0].eos_token_ids == (2,)


def test_sampling_is_seeded(small):
    target, draft, ids = small

    def sample(method, seed=None):
        if seed is not None:
            torch.manual_seed(seed)
        return target.generate(ids, max_new_tokens=30, do_sample=True, custom_generate=method)

    method = assisted(draft, "fixed:3")
    a, b, c = sample(method, 11), sample(method, 11), sample(method, 12)
    assert torch.equal(a, b) and not torch.equal(a, c)  # torch's default generator seeds each call
    fixed = assisted(draft, "fixed:3", seed=5)
    assert torch.equal(sample(fixed, 1), sample(fixed, 2))  # an explicit seed wins over the global one
    # top_k=1 leaves one token per position: sampling must then give the greedy output
    one = target.generate(ids, max_new_tokens=30, do_sample=True, top_k=1, custom_generate=method)
    assert torch.equal(one, greedy(target, {"input_ids": ids}, max_new_tokens=30))


class _Never(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


UNSUPPORTED = {
    "batch": ({"input_ids": torch.tensor([[5, 6, 7], [8, 9, 10]])}, "batch size 2"),
    "beams": ({"num_beams": 2}, "num_beams=2"),
    "num_return_sequences": ({"num_return_sequences": 2, "do_sample": True}, "num_return_sequences=2"),
    "padding": ({"attention_mask": torch.tensor([[0, 1, 1]])}, "padding"),
    "repetition_penalty": ({"repetition_penalty": 1.3}, "RepetitionPenaltyLogitsProcessor"),
    "no_repeat_ngram": ({"no_repeat_ngram_size": 2}, "NoRepeatNGramLogitsProcessor"),
    "min_new_tokens": ({"min_new_tokens": 3}, "MinNewTokensLengthLogitsProcessor"),
    "min_p": ({"do_sample": True, "min_p": 0.1}, "MinPLogitsWarper"),
    "max_time": ({"max_time": 5.0}, "MaxTimeCriteria"),
    "stopping_criteria": ({"stopping_criteria": StoppingCriteriaList([_Never()])}, "_Never"),
    "output_scores": ({"return_dict_in_generate": True, "output_scores": True}, "output_scores"),
    "inputs_embeds": ({"input_ids": None, "inputs_embeds": torch.zeros(1, 3, 64)}, "inputs_embeds"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_settings_raise(small, case):
    target, draft, _ = small
    kwargs, message = UNSUPPORTED[case]
    kwargs = {"input_ids": torch.tensor([[5, 6, 7]]), "max_new_tokens": 5, **kwargs}
    if kwargs["input_ids"] is None:
        del kwargs["input_ids"]
    with pytest.raises(GenerateError, match=message) as info:
        target.generate(**kwargs, custom_generate=assisted(draft))
    assert isinstance(info.value, ValueError) and isinstance(info.value, SpeckvError)


def test_unsupported_models_and_arguments_raise(small):
    from transformers import TextStreamer

    target, draft, ids = small
    with pytest.raises(GenerateError, match="vocabulary: target has 128 tokens, draft has 64"):
        target.generate(ids, max_new_tokens=5, custom_generate=assisted(tiny_target(vocab_size=64)))
    with pytest.raises(GenerateError, match="assistant_model differs"):
        target.generate(
            ids, max_new_tokens=5, assistant_model=tiny_target(1), custom_generate=assisted(draft)
        )
    # the same draft given both ways is fine
    out = target.generate(ids, max_new_tokens=5, assistant_model=draft, custom_generate=assisted(draft))
    assert out.shape[1] == ids.shape[1] + 5

    class Tok:
        def decode(self, *args, **kwargs):
            return ""

    with pytest.raises(GenerateError, match="streamer"):
        target.generate(ids, max_new_tokens=5, streamer=TextStreamer(Tok()), custom_generate=assisted(draft))
    with pytest.raises(SpeckvError, match="unknown controller"):
        assisted(draft, "fixd:4")
    with pytest.raises(SpeckvError, match="gamma_max"):
        assisted(draft, gamma_max=0)


def test_unsupported_quantization_raises():
    class Config:
        quantization_config = {"quant_method": "gptq", "bits": 4}

    class Model:
        config = Config()

    with pytest.raises(GenerateError, match="gptq"):
        detect_compression(Model())
    Config.quantization_config = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "fp4",
    }
    with pytest.raises(GenerateError, match="only nf4"):
        detect_compression(Model())


def test_called_outside_generate(small):
    """The callable also works when called directly (no generate() frame to inspect)."""
    target, draft, ids = small
    from transformers import GenerationConfig

    config = GenerationConfig(max_length=ids.shape[1] + 6, do_sample=False)
    out = AssistedGenerate(draft, "fixed:2")(target, ids, generation_config=config)
    assert torch.equal(out, greedy(target, {"input_ids": ids}, max_new_tokens=6))
