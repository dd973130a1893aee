import numpy as np
import pytest
import torch
from eval_synthetic import GAMMA_MAX, write_mlp_export, write_traces
from speckv.predictor.evaluation.live import hf_role, run_live
from speckv.predictor.evaluation.paper import PaperController
from speckv.predictor.features import RUNNING
from speckv.predictor.runtime import MLPController, load_export
from speckv.profiling.controllers import parse_controller
from speckv.profiling.costmodel import StepCosts
from speckv.profiling.decode import DecodeConfig, speculative_generate
from speckv.profiling.errors import SpeckvError
from speckv.profiling.models import ModelPair
from speckv.profiling.replay import Trace, load_traces, oracle, replay, traces_from_frame
from speckv.profiling.signals import SIGNALS
from tiny import char_tokenizer

POLICIES = [
    "none",
    *(f"fixed:{k}" for k in range(1, 5)),
    "heuristic",
    "heuristic:2",
    "threshold:0.4",
    "threshold:0.8",
    "entropy:0.5",
    "entropy:1.5",
    "threshold:0.6+trim",
    "entropy:1+trim",
]


def random_trace(rng: np.random.Generator, n_new: int, gamma_max: int = 4) -> Trace:
    match = np.minimum(rng.geometric(1 - rng.uniform(0.1, 0.9), n_new) - 1, gamma_max)
    p = rng.uniform(0, 1, (n_new, gamma_max))
    signals = np.stack([p, p, p / 2, 3 * (1 - p)], axis=-1)
    match = np.minimum(match, n_new - np.arange(n_new))
    top1 = rng.uniform(0.2, 1.0, n_new)
    return Trace("p", "t", "test", "fp32", match, 10 + np.arange(n_new), signals, top1, 2 * (1 - top1))


def random_costs(rng: np.random.Generator, gamma_max: int = 4) -> StepCosts:
    """Steps dearer with gamma and with context, a draft whose first forward reads the prompt."""
    return StepCosts(
        np.cumsum(rng.uniform(0.5, 10, gamma_max + 1)) + rng.uniform(5, 60),
        rng.uniform(0, 5),
        context=30.0,
        slopes=np.sort(rng.uniform(0, 0.2, gamma_max + 1)),
        draft_slope=rng.uniform(0, 0.01),
        prefill=(rng.uniform(0, 20), rng.uniform(0, 1)),
        draft_prefill=(rng.uniform(0, 10), rng.uniform(0, 0.3)),
        switch=(rng.uniform(0, 3), rng.uniform(0, 3)),
    )


class RateStub:
    """Stands in for the paper's regressor: the rate follows the previous draft's mean draft_prob."""

    def predict(self, X: np.ndarray) -> np.ndarray:
        return X[:, RUNNING.index("draft_prob_mean")] * (1 - 0.05 * X[:, -1])


def paper_stub(cost: list[float]) -> PaperController:
    return PaperController(RateStub(), np.full(len(RUNNING), 0.5), cost, 4, "fp32")


def brute_force_ms(trace: Trace, cost: StepCosts, i: int = 0, drafted: bool = False) -> float:
    """Every gamma sequence tried: a step at its own context, the prompt's read (at its shortest) on the
    draft's first draft."""
    if i >= trace.n_new:
        return 0.0
    position = int(trace.position[i])
    return min(
        cost.step(g, position)
        + (cost.draft_first(int(trace.position[0])) if g and not drafted else 0.0)
        + brute_force_ms(
            trace, cost, i + min(min(int(trace.match_len[i]), g) + 1, trace.n_new - i), drafted or g > 0
        )
        for g in range(min(trace.gamma_max, trace.n_new - i - 1) + 1)
    )


def test_oracle_is_the_shortest_path():
    rng = np.random.default_rng(0)
    for _ in range(30):
        trace, cost = random_trace(rng, int(rng.integers(1, 9))), random_costs(rng)
        assert oracle(trace, cost).model_ms == pytest.approx(brute_force_ms(trace, cost))


def test_oracle_never_worse_than_any_policy():
    rng = np.random.default_rng(1)
    for _ in range(150):
        trace, cost = random_trace(rng, int(rng.integers(1, 60))), random_costs(rng)
        best = oracle(trace, cost)
        assert sum(a + 1 for a in best.accepts) >= trace.n_new
        controllers = [parse_controller(spec, 4) for spec in POLICIES] + [paper_stub(cost)]
        for controller in controllers:
            result = replay(controller, trace, cost)
            assert best.model_ms <= result.model_ms + 1e-9, controller.name
            assert best.goodput >= result.goodput - 1e-9


def test_replay_fixed_accepts_min_of_match_and_gamma():
    trace = random_trace(np.random.default_rng(2), 40)
    cost = [10.0, 11, 12, 13, 14]
    for k in range(1, 5):
        result = replay(parse_controller(f"fixed:{k}", 4), trace, cost)
        i = 0
        for gamma, accepted in zip(result.gammas, result.accepts, strict=True):
            assert gamma == min(k, trace.n_new - i - 1)
            assert accepted == min(int(trace.match_len[i]), gamma)
            i += accepted + 1
        assert i >= trace.n_new
        assert result.model_ms == pytest.approx(sum(cost[g] for g in result.gammas))


def test_replay_equals_live_loop(tiny_models, tmp_path):
    from speckv.profiling.trace_reference import dense_trace

    target, draft = tiny_models
    tok = char_tokenizer()
    prompt = tok("def f(x): return", add_special_tokens=False)["input_ids"]
    run = {"prompt_id": "p0", "task": "code", "split": "test", "compression": "fp32"}
    config = DecodeConfig(max_new_tokens=40, gamma_max=4)
    trace = traces_from_frame(dense_trace(target, draft, prompt, 4, 40, (), run).to_pandas())[0]
    assert trace.match_len.sum() > 0  # the pair agrees sometimes, or the test proves little
    cost = StepCosts([10.0 + k for k in range(5)], 0.5)
    specs = ["none", "fixed:1", "fixed:2", "fixed:4", "heuristic", "threshold:0.4", "entropy:2"]
    specs += ["threshold:0.6+trim", "entropy:1+trim", "mlp"]
    predictor = load_export(write_mlp_export(tmp_path / "export", gamma_max=4))
    trimmed = 0
    for spec in specs:

        def make(spec=spec):
            if spec == "mlp":
                return MLPController(predictor, 4, "fp32", name="mlp")
            return parse_controller(spec, 4)

        live = speculative_generate(target, draft, prompt, make(), config)
        replayed = replay(make(), trace, cost, max_new_tokens=40)
        assert (replayed.gammas, replayed.accepts) == (live.gammas, live.accepts), spec
        assert replayed.new_tokens == live.new_tokens
        assert (replayed.first_tokens, replayed.decode_tokens) == (live.produced[0], live.decode_tokens)
        trimmed += replayed.trimmed
        # with a cost that grows with the context, each step is charged at the context the loop was at
        grows = StepCosts(cost, 0.5, context=20.0, slopes=[0.1 * (k + 1) for k in range(5)])
        timed = replay(make(), trace, grows, max_new_tokens=40)
        if timed.trimmed == 0 and not make().needs_signals:
            expected = [grows.step(g, p) for g, p in zip(live.gammas, live.positions, strict=True)]
            assert timed.model_ms == pytest.approx(sum(expected))
            assert timed.decode_ms == pytest.approx(sum(expected[1:]))
    assert trimmed > 0  # some trim happened, or the trim paths were not compared


def test_live_runs_are_lossless_and_interleaved(tiny_models):
    target, draft = tiny_models
    pair = ModelPair(target, draft, char_tokenizer(), "fp32", torch.device("cpu"), "t", "d")
    tok = char_tokenizer()
    prompts = [
        {"prompt_id": f"p{i}", "task": "code", "input_ids": tok(text, add_special_tokens=False)["input_ids"]}
        for i, text in enumerate(["import os", "x = 1 +"])
    ]
    roles = {
        "none": parse_controller("none", 4),
        "fixed:3": parse_controller("fixed:3", 4),
        "hf-assisted": hf_role("hf-assisted", 4),
        "hf-threshold": hf_role("hf-threshold", 4, threshold=0.3),
    }
    rows = run_live(pair, prompts, roles, DecodeConfig(max_new_tokens=16, gamma_max=4), warmup_tokens=4)
    assert len(rows) == 8
    assert all(r["matches_none"] for r in rows if not r["policy"].startswith("hf-"))
    assert {r["spec"] for r in rows if r["policy"] == "hf-threshold"} == {
        'hf-threshold{"num_assistant_tokens_schedule": "constant", "num_assistant_tokens": 4, '
        '"assistant_confidence_threshold": 0.3}'
    }
    assert all(r["new_tokens"] > 0 and r["wall_s"] > 0 for r in rows)
    with pytest.raises(ValueError, match="none"):
        run_live(pair, prompts, {"fixed:3": roles["fixed:3"]}, DecodeConfig(max_new_tokens=4), 0)


def test_bad_traces_fail_clearly(tmp_path):
    with pytest.raises(SpeckvError, match="not found"):
        load_traces(tmp_path / "missing")
    frame = load_traces_frame(write_traces(tmp_path / "traces", per_split=1, compressions=("fp32",)))
    with pytest.raises(SpeckvError, match="not dense"):
        traces_from_frame(frame.drop(index=frame.index[3]))
    with pytest.raises(SpeckvError, match="lacks columns"):
        traces_from_frame(frame.drop(columns=["match_len"]))
    trace = traces_from_frame(frame)[0]
    with pytest.raises(SpeckvError, match="cost model covers"):
        oracle(trace, [1.0, 2.0])
    assert trace.gamma_max == GAMMA_MAX and trace.signals.shape[-1] == len(SIGNALS)


def load_traces_frame(path):
    import pyarrow.dataset as ds

    frame = ds.dataset(path, format="parquet", partitioning="hive").to_table().to_pandas()
    return frame.astype({"compression": str, "task": str})


def test_exhaustive_tiny_case():
    # gamma_max 1: drafting pays where the draft matches, unless a drafted token costs more than a step
    trace = Trace(
        "p",
        "t",
        "test",
        "fp32",
        np.array([1, 0, 1, 0]),
        np.arange(4),
        np.zeros((4, 1, 4)),
        np.ones(4),
        np.zeros(4),
    )
    assert oracle(trace, [10.0, 11.0]).gammas == [1, 1]
    assert oracle(trace, [10.0, 30.0]).gammas == [0, 0, 0, 0]


def test_paper_controller_follows_the_previous_draft():
    # Drafts from the first 20 positions are confident (draft_prob 0.95), later ones doubtful (0.05). With these
    # costs the stub's rate makes gamma 4 pay after a confident draft (and at the 0.5 default), no draft after a
    # doubtful one; without a draft there are no new aggregates, so gamma stays 0.
    n_new, cost = 60, [40.0, 45, 50, 55, 60]
    p = np.where(np.arange(n_new) < 20, 0.95, 0.05)[:, None].repeat(4, 1)
    match = np.minimum(2, n_new - np.arange(n_new))
    signals = np.stack([p, p, p / 2, 3 * (1 - p)], -1)
    trace = Trace(
        "p", "t", "test", "fp32", match, 10 + np.arange(n_new), signals, np.ones(n_new), np.zeros(n_new)
    )
    result = replay(paper_stub(cost), trace, cost)
    starts = np.cumsum([0] + [a + 1 for a in result.accepts])[:-1]
    doubtful = int(np.argmax(starts >= 20))  # the first step that drafts from a doubtful position
    assert result.gammas == [4] * (doubtful + 1) + [0] * (len(result.gammas) - doubtful - 1)


def test_replay_charges_what_reading_signals_costs():
    """threshold:0.5 reads the signals of every drafted token but a budget's last; the MLP also reads the
    target's confidence once per step; fixed gamma reads nothing."""
    rng = np.random.default_rng(5)
    trace = random_trace(rng, 30)
    plain = StepCosts([10.0, 11, 12, 13, 14], 1.0)
    charged = StepCosts(plain, 1.0, signal_ms=0.5, target_signal_ms=0.25)
    for spec in ("fixed:3", "threshold:0.5"):
        a = replay(parse_controller(spec, 4), trace, plain)
        b = replay(parse_controller(spec, 4), trace, charged)
        assert (a.gammas, a.accepts) == (b.gammas, b.accepts)
        if spec == "fixed:3":
            assert b.model_ms == a.model_ms
        else:
            i, reads = 0, 0
            for k, accepted in zip(b.gammas, b.accepts, strict=True):
                budget = min(4, trace.n_new - i - 1)
                reads += k if k < budget else max(budget - 1, 0)
                i += accepted + 1
            assert b.model_ms == pytest.approx(a.model_ms + 0.5 * reads)
    assert charged.with_signals(True)[2] == pytest.approx(12 + 2 * 0.5 + 0.25)


class Scripted:
    """Drafts script[step] tokens at each step, whatever happens."""

    name = "scripted"
    needs_signals = needs_target_signals = False

    def __init__(self, script: list[int]) -> None:
        self.script = script

    def reset(self) -> None:
        pass

    def start_step(self, ctx) -> int:
        return self.script[ctx.step]

    def submit(self, drafted: int) -> int:
        return drafted

    def observe(self, drafted: int, accepted: int) -> None:
        pass


def test_replay_charges_switching_between_drafting_and_not():
    """An idle step right after a drafting one pays switch[0], a drafting step right after an idle one
    switch[1]; steps before the draft's first draft (which pays draft_first instead) pay neither."""
    n = 10
    trace = Trace(
        "p", "t", "test", "fp32", np.zeros(n, int), 10 + np.arange(n), np.zeros((n, 4, 4)), *[np.ones(n)] * 2
    )
    costs = StepCosts([10.0, 20, 30, 40, 50], 1.0, switch=(2.0, 3.0))
    result = replay(Scripted([0, 1, 0, 0, 2, 0, 1, 1, 0, 0]), trace, costs)
    assert result.gammas == [0, 1, 0, 0, 2, 0, 1, 1, 0, 0]
    # 10 | 20 (first draft) | 10+2 | 10 | 30+3 | 10+2 | 20+3 | 20 | 10+2 | 10
    assert result.model_ms == pytest.approx(162.0)
    assert replay(Scripted([0, 1, 0, 0, 2, 0, 1, 1, 0, 0]), trace, StepCosts(costs, 1.0)).model_ms == 150.0
    # a draft trimmed to nothing: the target verifies alone right after the draft, like an idle step after
    # a drafting one; a partly trimmed draft still verifies drafted tokens
    assert costs.trimmed(1, 0) == 10.0 + 1.0 + 2.0 and costs.trimmed(3, 1) == 20.0 + 2.0


def test_a_compressed_draft_runs_live_beside_its_target(tiny_pair_dir):
    """draft_compression `same` loads the draft at the target's compression; our loop and transformers'
    assisted generation both run that one draft, losslessly."""
    from speckv.profiling.models import draft_compression_for, load_pair

    assert draft_compression_for(None, "int8") is None
    assert draft_compression_for("same", "nf4") == "nf4"
    assert draft_compression_for("int8", "fp32") == "int8"
    with pytest.raises(SpeckvError, match="draft_compression 'int4' is not valid"):
        draft_compression_for("int4", "fp32")
    target_dir, draft_dir = tiny_pair_dir
    pair = load_pair(
        str(target_dir),
        str(draft_dir),
        "int8",
        "cpu",
        draft_compression=draft_compression_for("same", "int8"),
    )
    assert type(pair.draft.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    prompts = [{"prompt_id": "p0", "task": "code", "input_ids": list(range(10, 30))}]
    roles = {
        "none": parse_controller("none", 4, "int8"),
        "fixed:3": parse_controller("fixed:3", 4, "int8"),
        "hf-assisted": hf_role("hf-assisted", 4, assistant=pair.draft),
    }
    rows = run_live(pair, prompts, roles, DecodeConfig(max_new_tokens=12, gamma_max=4), warmup_tokens=0)
    assert all(r["matches_none"] for r in rows)


def test_a_role_tuned_to_another_roles_controller_shares_its_run(tiny_models):
    target, draft = tiny_models
    pair = ModelPair(target, draft, char_tokenizer(), "fp32", torch.device("cpu"), "t", "d")
    tok = char_tokenizer()
    prompts = [
        {
            "prompt_id": "p0",
            "task": "code",
            "input_ids": tok("import os", add_special_tokens=False)["input_ids"],
        }
    ]
    roles = {"none": parse_controller("none", 4), "fixed:2": parse_controller("fixed:2", 4)}
    config = DecodeConfig(max_new_tokens=12, gamma_max=4)
    rows = run_live(pair, prompts, roles, config, warmup_tokens=0, run_of={"best-fixed": "none"})
    by_policy = {r["policy"]: r for r in rows}
    assert set(by_policy) == {"none", "fixed:2", "best-fixed"}
    shared, own = by_policy["best-fixed"], by_policy["none"]
    assert (
        shared["run_of"] == "none" and own["run_of"] == "none" and by_policy["fixed:2"]["run_of"] == "fixed:2"
    )
    assert shared["wall_s"] == own["wall_s"] and shared["spec"] == own["spec"] == "none"
    with pytest.raises(ValueError, match="shared runs"):
        run_live(pair, prompts, roles, config, 0, run_of={"best-fixed": "fixed:9"})
