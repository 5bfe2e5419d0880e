"""Drafters behind one interface: a draft model (optionally prompt-lookup first) and a
model-free prompt-lookup drafter.

Each drafts one token per `step` so the servicer can stream tokens, check
cancellation and stop rules between them.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field

import torch

from specdec.compute import packed
from specdec.compute.model_runner import ModelRunner
from specdec.compute.sessions import KVSession, SessionStore, crop_cache
from specdec.errors import InvalidRequest, SessionNotFound
from specdec.lookup import lookup_continuation
from specdec.models.eagle import fused_inputs, is_feature_drafter
from specdec.models.loader import LoadedModel
from specdec.sampling import DRAFT, DraftDist, entropy, sample_index, truncate_support, uniform, warp_logits
from specdec.sampling_params import SamplingParams
from specdec.stopping import DraftStep, entropy_with_acceptance_bound

COMMITTED_LEN = "committed_len"  # session.extra: context tokens the target has committed

StepResult = tuple[DraftStep, DraftDist | None] | None


@dataclass(frozen=True)
class StepItem:
    """One session's next draft step, as a batched step receives it."""

    session: KVSession
    sampling: SamplingParams
    support: int  # sampled drafts keep q's top-`support` tokens (0: dense)


class Drafter(abc.ABC):
    """Proposes tokens for sessions whose context the coordinator keeps in sync."""

    def __init__(self, max_sessions: int, session_ttl_s: float, vocab_size: int):
        self.sessions = SessionStore(max_sessions, session_ttl_s)
        self.vocab_size = vocab_size

    @property
    @abc.abstractmethod
    def version(self) -> str: ...

    reads_target_hidden = False  # feature-level drafters want the target's HiddenStates with their context

    def sync(self, session_id: str, base_len: int, tokens: list[int], request_id: str = "",
             hidden: tuple[int, torch.Tensor] | None = None, committed_len: int = 0) -> KVSession:
        """Brings the session to context[:base_len] + tokens, creating it when base_len is 0.

        `hidden` (start, features [n, H]) is for drafters that read target features; others ignore it.
        `committed_len` says how much of the context the target has committed (0: all of it).
        """
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(f"token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if not tokens and base_len == 0:
            raise InvalidRequest("the context to draft from is empty")
        if base_len == 0:
            # A new request, or the drafter restarted / swapped: (re)create from the full context.
            self.sessions.release(session_id)
            session = self.sessions.create(session_id, request_id)
        else:
            session = self.sessions.get(session_id)
        try:
            session.reconcile(base_len, tokens)
        except ValueError as err:
            raise InvalidRequest(str(err)) from None
        session.extra[COMMITTED_LEN] = min(committed_len, len(session.ids)) or len(session.ids)
        return session

    @abc.abstractmethod
    def step_many(self, items: list[StepItem]) -> list[StepResult]:
        """Drafts one token for each session, appends it and returns it (None: nothing to propose);
        model drafters run every session's step in one forward pass."""

    def step(self, session: KVSession, sampling: SamplingParams, support: int) -> StepResult:
        return self.step_many([StepItem(session, sampling, support)])[0]

    def release(self, session_id: str) -> bool:
        return self.sessions.release(session_id)


@dataclass
class LookupRecord:
    """Per session: at each committed position, whether the lookup rule proposed a token there
    (None: no repeat) and whether it was the token that followed. An index of each n-gram's
    latest continuation makes scoring a position O(1) instead of a scan of the context."""

    outcomes: list[bool | None] = field(default_factory=list)  # outcomes[i]: the rule on ids[:i] vs ids[i]
    scored: list[int] = field(default_factory=list)            # the ids those outcomes were scored on
    latest: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> index of the token after it

    def score(self, ids: list[int], upto: int, ngram_max: int, ngram_min: int) -> None:
        """Scores positions up to `upto`, first dropping all if the scored text changed (a caller
        that did not say what was committed may have had drafts replaced)."""
        if self.scored != ids[:len(self.scored)]:
            self.outcomes, self.scored, self.latest = [], [], {}
        for position in range(len(self.outcomes), upto):
            grams = [tuple(ids[position - n:position]) for n in range(min(ngram_max, position), ngram_min - 1, -1)]
            follower = next((self.latest[gram] for gram in grams if gram in self.latest), None)
            self.outcomes.append(None if follower is None else ids[follower] == ids[position])
            self.scored.append(ids[position])
            for gram in grams:
                self.latest[gram] = position


@dataclass(frozen=True)
class PromptLookup:
    """Where the context's last n-gram (ngram_min <= n <= ngram_max) occurred before, propose what followed.

    A lookup draft is certain (q is one-hot) but often wrong outside copy-heavy text, so its
    `accept_prob` and entropy carry the rule's measured precision on this request's committed
    text (the last `window` positions where it proposed something, Laplace-smoothed): the stop
    rules then end a lookup chain as they would a model's instead of trusting it blindly.
    """

    ngram_max: int = 3
    ngram_min: int = 2
    window: int = 64

    def propose(self, session: KVSession, sampling: SamplingParams) -> tuple[DraftStep, DraftDist | None] | None:
        token = lookup_continuation(session.ids, self.ngram_max, self.ngram_min)
        if token is None:
            return None
        precision = self.precision(session)
        session.ids.append(token)
        # Drawn with certainty, so q is one-hot: rejection sampling against it stays exact.
        dist = None if sampling.greedy else DraftDist(torch.ones(1), torch.tensor([token]))
        return DraftStep(token, 1.0, entropy_with_acceptance_bound(precision), precision), dist

    def precision(self, session: KVSession) -> float:
        """How often the rule's proposals were the committed token, over the recent committed text."""
        record: LookupRecord = session.extra.setdefault("lookup", LookupRecord())
        committed = min(session.extra.get(COMMITTED_LEN, len(session.ids)), len(session.ids))
        record.score(session.ids, committed, self.ngram_max, self.ngram_min)
        tried = [hit for hit in record.outcomes if hit is not None][-self.window:]
        return (sum(tried) + 1) / (len(tried) + 2)


class ModelDrafter(Drafter):
    """Any HF causal LM sharing the target's tokenizer. Hot-swappable between rounds.

    With `lookup`, a step that finds the context repeating itself drafts the continuation
    for free; the model reads such tokens with its next step's forward, which costs about
    one token's with the small-batch kernel.
    """

    def __init__(self, loaded: LoadedModel, max_sessions: int = 64, session_ttl_s: float = 300.0,
                 accept_head: torch.nn.Module | None = None, small_gemm: bool = False,
                 lookup: PromptLookup | None = None, quantise_to: str = ""):
        super().__init__(max_sessions, session_ttl_s, loaded.vocab_size)
        self._swap_lock = threading.Lock()
        self.small_gemm = small_gemm
        self.quantise_to = quantise_to  # applied to every version installed, hot-swapped ones included
        self.lookup = lookup
        self._install(loaded, self._runner_for(loaded), accept_head, generation=0)

    def _runner_for(self, loaded: LoadedModel) -> ModelRunner:
        """Routes `loaded` through the kernel (and rounds it to blocks), before any request sees it."""
        return ModelRunner(loaded.model, loaded.device, self.small_gemm, loaded.gguf_path, self.quantise_to)

    def _install(self, loaded: LoadedModel, runner: ModelRunner, accept_head, generation: int) -> None:
        self.loaded = loaded
        self.runner = runner
        self.accept_head = accept_head
        self.generation = generation

    @property
    def version(self) -> str:
        return self.loaded.version

    def swap(self, loaded: LoadedModel, accept_head: torch.nn.Module | None = None) -> None:
        """Installs a new drafter version; in-flight sessions re-prefill on their next step."""
        if loaded.vocab_size != self.vocab_size or loaded.fingerprint != self.loaded.fingerprint:
            raise InvalidRequest("the new drafter version does not share the tokenizer of the current one")
        if is_feature_drafter(loaded.model) != self.reads_target_hidden:
            raise InvalidRequest("the new drafter version reads different inputs (target features or tokens) "
                                 "than the current one")
        runner = self._runner_for(loaded)  # outside the lock: drafting goes on meanwhile
        with self._swap_lock:
            self._install(loaded, runner, accept_head, self.generation + 1)

    @torch.inference_mode()
    def step_many(self, items: list[StepItem]) -> list[StepResult]:
        results: list[StepResult] = [None] * len(items)
        modelled = []
        for i, item in enumerate(items):
            proposed = self.lookup.propose(item.session, item.sampling) if self.lookup is not None else None
            if proposed is not None:
                results[i] = proposed
            else:
                modelled.append(i)
        if not modelled:
            return results
        with self._swap_lock:
            runner, accept_head, generation = self.runner, self.accept_head, self.generation
        sessions = [items[i].session for i in modelled]
        for session in sessions:
            if session.extra.get("generation") != generation:
                session.cache, session.cached_len = None, 0  # KV of another model version is meaningless
                session.extra["generation"] = generation
        forwards = self._forward_many(sessions, runner, output_hidden=accept_head is not None)
        for i, forward in zip(modelled, forwards):
            if forward is not None:
                results[i] = self._choose(items[i], *forward, accept_head)
        return results

    @staticmethod
    def _choose(item: StepItem, last: torch.Tensor, hidden: torch.Tensor | None, accept_head) -> StepResult:
        """Picks the draft token from its logits last [1, V] (hidden [n, H] feeds the acceptance head)."""
        session, sampling = item.session, item.sampling
        position = len(session.ids)
        if sampling.greedy:
            probs = last.float().softmax(-1)[0]
            token = int(probs.argmax())
            dist = None
        else:
            probs = warp_logits(last, sampling)[0]
            indices, values = truncate_support(probs, item.support)
            token = int(indices[sample_index(values, uniform(sampling.seed, position, DRAFT))])
            dist = DraftDist(values, indices)
        confidence = float(probs[token])
        accept_prob = float(accept_head(hidden[-1:].float())[0]) if accept_head is not None else confidence
        session.ids.append(token)
        return DraftStep(token, confidence, entropy(probs), accept_prob), dist

    def _forward_many(self, sessions: list[KVSession], runner: ModelRunner,
                      output_hidden: bool) -> list[tuple[torch.Tensor, torch.Tensor | None] | None]:
        """Per session the draft logits [1, V] (and hidden states [n, H]) for the token after its ids."""
        return runner.extend(sessions, output_hidden=output_hidden, keep_logits=1)


@dataclass
class FeatureRows:
    """A feature drafter session's KV rows. Row j consumed (ids[j+1], feature j)."""

    ids: list[int] = field(default_factory=list)  # ids[j+1] of every row in the KV
    true_rows: int = 0                             # rows [0, true_rows) were fed the target's own features
    outputs: list[torch.Tensor] = field(default_factory=list)  # predicted feature after each row, [H]


class FeatureDrafter(ModelDrafter):
    """An EAGLE drafter (specdec.models.eagle): drafts from the target's features where the
    verifier has sent them, and from its own predictions of them past that point.

    Rows fed a predicted feature are recomputed once the target's feature for that
    position arrives. A context with no target feature yet gets no proposal.
    """

    reads_target_hidden = True

    @property
    def hidden_size(self) -> int:
        """Width of the target features it reads (its own hidden size, which the target's equals)."""
        return int(self.loaded.model.config.hidden_size)

    def sync(self, session_id, base_len, tokens, request_id="", hidden=None, committed_len=0):
        session = super().sync(session_id, base_len, tokens, request_id, committed_len=committed_len)
        known = session.extra.get("features")
        if known is None or base_len == 0:
            known = torch.zeros(0, self.hidden_size)
        if hidden is not None and hidden[1].shape[0]:
            start, rows = hidden
            if start > known.shape[0]:
                raise SessionNotFound(f"target features from position {start} but only {known.shape[0]} are known; "
                                      "resend the context")
            known = torch.cat([known[:start], rows])
        session.extra["features"] = known[:len(session.ids)]
        return session

    def _forward_many(self, sessions, runner, output_hidden):
        """Feeds each session's rows in packed passes: first the rows the target's features are now known for,
        then one row per token past them (each reads the feature the previous row predicted)."""
        plans = [self._plan(session, runner) for session in sessions]
        live = [plan for plan in plans if plan is not None]
        while live:
            groups = [plan.next_group() for plan in live]
            embeds = [fused_inputs(runner.model, ids[None], features[None])[0] for ids, features in groups]
            rows = [(ids.tolist(), len(plan.rows.ids), plan.session.cache) for plan, (ids, _) in zip(live, groups)]
            results = packed.packed_forward(runner.model, rows, runner.device, [1] * len(live), True, embeds)
            for plan, (ids, features), (logits, outputs) in zip(live, groups, results):
                plan.fed(ids, features, logits, outputs)
            live = [plan for plan in live if not plan.done]
        return [None if plan is None else (plan.logits, plan.rows.outputs[-1][None] if output_hidden else None)
                for plan in plans]

    def _plan(self, session: KVSession, runner: ModelRunner) -> _FeaturePlan | None:
        """What `session` must feed before its draft logits exist, after dropping stale rows; None: no proposal."""
        features = session.extra.get("features")
        need = len(session.ids) - 1  # rows 0..need-1; the last one drafts the next token
        if features is None or features.shape[0] == 0 or need < 1:
            return None
        rows: FeatureRows = session.extra.get("rows") if session.cache is not None else None
        if rows is None:
            session.cache, rows = None, FeatureRows()
            session.extra["rows"] = rows
        known = min(features.shape[0], need)
        valid = 0
        while valid < min(len(rows.ids), need) and rows.ids[valid] == session.ids[valid + 1]:
            valid += 1
        if known > rows.true_rows:
            valid = min(valid, rows.true_rows)  # rows fed a prediction where the target's feature is now known
        valid = min(valid, need - 1)  # the last row is always (re)fed: its logits are the draft
        self._crop_rows(session, rows, valid)
        if session.cache is None:
            session.cache = runner.new_cache()
        session.cached_len = len(session.ids)
        return _FeaturePlan(session, rows, need, known, features)

    @staticmethod
    def _crop_rows(session: KVSession, rows: FeatureRows, keep: int) -> None:
        if session.cache is not None and keep < len(rows.ids):
            crop_cache(session.cache, keep)
        del rows.ids[keep:], rows.outputs[keep:]
        rows.true_rows = min(rows.true_rows, keep)


@dataclass
class _FeaturePlan:
    """One feature-drafter session's rows still to feed in this step."""

    session: KVSession
    rows: FeatureRows
    need: int                      # rows the KV must hold before the draft logits exist
    known: int                     # rows the target's own features are known for
    features: torch.Tensor         # the target's features [known+, H]
    logits: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return len(self.rows.ids) >= self.need

    def next_group(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(next ids [n], features [n, H]): the rows with known target features at once, else one row that
        reads the previous row's predicted feature."""
        ids, start = self.session.ids, len(self.rows.ids)
        if start < self.known:
            return torch.tensor(ids[start + 1:self.known + 1]), self.features[start:self.known]
        return torch.tensor([ids[start + 1]]), self.rows.outputs[start - 1][None]

    def fed(self, ids: torch.Tensor, features: torch.Tensor, logits: torch.Tensor, outputs: torch.Tensor) -> None:
        self.rows.ids.extend(ids.tolist())
        self.rows.outputs.extend(outputs)
        self.rows.true_rows = max(self.rows.true_rows, min(len(self.rows.ids), self.known))
        self.logits = logits


class NgramDrafter(Drafter):
    """Prompt lookup alone: no model, nothing to propose where the context does not repeat."""

    def __init__(self, vocab_size: int, ngram_max: int = 3, ngram_min: int = 2, max_sessions: int = 256,
                 session_ttl_s: float = 300.0):
        super().__init__(max_sessions, session_ttl_s, vocab_size)
        self.lookup = PromptLookup(ngram_max, ngram_min)

    @property
    def version(self) -> str:
        return f"ngram-{self.lookup.ngram_min}-{self.lookup.ngram_max}"

    def step_many(self, items):
        return [self.lookup.propose(item.session, item.sampling) for item in items]
