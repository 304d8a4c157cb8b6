"""The fusion policy: user/context features -> a Dirichlet over the weight simplex.

An MLP over standardised numeric features and embedded categorical features feeds two heads:

- the mean  mu(x) = softmax(logits(x)) in the simplex (serving uses it: deterministic weights),
- the concentration kappa(x) = kappa_min + (kappa_max - kappa_min) * sigmoid(.) (adaptive exploration:
  a small kappa explores widely, a large one exploits); or a fixed kappa for the ablation.

The policy is Dir(alpha), alpha = kappa * mu + alpha_floor. The floor keeps every alpha_k bounded away
from 0: below ~0.1 float32 samples underflow to 1e-38 and log-densities explode.

Weights are saved as safetensors + a JSON config (never pickle); the serving forward is TorchScript-able.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from grade.core import store

WEIGHTS_FILE = "policy.safetensors"
CONFIG_FILE = "policy.json"
TORCHSCRIPT_FILE = "policy.torchscript.pt"
#: beside the TorchScript export: a fixed batch of inputs and the weights the evaluated policy gives them
PROBE_FILE = "policy.probe.safetensors"
#: requests in the probe batch
PROBE_ROWS = 8


@dataclasses.dataclass
class PolicyConfig:
    n_numeric: int
    """number of numeric (u_*) input features"""
    cat_sizes: list[int]
    """vocabulary size (incl. the OOV id 0) of each categorical (c_*) feature"""
    n_objectives: int
    """K: number of fused signals"""
    hidden: list[int] = dataclasses.field(default_factory=lambda: [64, 64])
    """hidden layer widths of the shared MLP"""
    emb_dim: int = 8
    """embedding width per categorical feature"""
    kappa_min: float = 10.0
    """lower bound of the Dirichlet concentration"""
    kappa_max: float = 400.0
    """upper bound of the Dirichlet concentration"""
    kappa_init: float = 50.0
    """initial concentration (sets the kappa head's bias)"""
    fixed_kappa: float | None = None
    """when set, kappa is this constant (the non-adaptive ablation)"""
    alpha_floor: float = 0.2
    """added to every alpha_k so that no component approaches 0"""
    init_mean: list[float] | None = None
    """initial mean weights (e.g. the static weights); uniform when None"""


class PolicyNet(nn.Module):
    """features (num [B, U] float32, cat [B, C] int64) -> (mu [B, K], kappa [B])."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.ModuleList([nn.Embedding(n, cfg.emb_dim) for n in cfg.cat_sizes])
        layers: list[nn.Module] = []
        width = cfg.n_numeric + cfg.emb_dim * len(cfg.cat_sizes)
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        self.trunk = nn.Sequential(*layers)
        self.mu_head = nn.Linear(width, cfg.n_objectives)
        self.kappa_head = nn.Linear(width, 1)
        self.kappa_min = float(cfg.kappa_min)
        self.kappa_max = float(cfg.kappa_max)
        self.fixed_kappa = -1.0 if cfg.fixed_kappa is None else float(cfg.fixed_kappa)
        self.alpha_floor = float(cfg.alpha_floor)
        self._init_heads()

    def _init_heads(self) -> None:
        # Start at the given mean (e.g. static weights) with a moderate concentration, so training
        # begins from the production behaviour rather than from a random point of the simplex.
        nn.init.zeros_(self.mu_head.weight)
        k = self.cfg.n_objectives
        mean = torch.full((k,), 1.0 / k) if self.cfg.init_mean is None else torch.tensor(self.cfg.init_mean)
        mean = mean.clamp_min(1e-4) / mean.clamp_min(1e-4).sum()
        with torch.no_grad():
            self.mu_head.bias.copy_(mean.log() - mean.log().mean())
            nn.init.normal_(self.kappa_head.weight, std=1e-3)
            frac = (self.cfg.kappa_init - self.kappa_min) / (self.kappa_max - self.kappa_min)
            frac = min(max(frac, 1e-3), 1 - 1e-3)
            self.kappa_head.bias.fill_(math.log(frac / (1 - frac)))

    def hidden(self, num: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        parts = [num]
        for i, emb in enumerate(self.embeddings):
            parts.append(emb(cat[:, i]))
        return self.trunk(torch.cat(parts, dim=-1))

    def logits(self, num: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        """Unnormalised mean logits [B, K] (the Gaussian/logistic-normal ablation explores around them)."""
        return self.mu_head(self.hidden(num, cat))

    def forward(self, num: torch.Tensor, cat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, kappa, _ = self.heads(self.hidden(num, cat))
        return mu, kappa

    def heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mu [B, K], kappa [B], kappa logit [B]) from the trunk's output h [B, H].

        The logit is the kappa head's output before the sigmoid: a loss on it keeps its gradient where
        kappa sits at one of its bounds (the sigmoid's gradient vanishes there).
        """
        mu = torch.softmax(self.mu_head(h), dim=-1)
        logit = self.kappa_head(h)[:, 0]
        if self.fixed_kappa > 0:
            kappa = torch.full_like(mu[:, 0], self.fixed_kappa)
        else:
            kappa = self.kappa_min + (self.kappa_max - self.kappa_min) * torch.sigmoid(logit)
        return mu, kappa, logit

    def alpha(self, num: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        """Dirichlet concentration parameters [B, K], every entry >= alpha_floor."""
        mu, kappa = self(num, cat)
        return kappa.unsqueeze(-1) * mu + self.alpha_floor

    @torch.no_grad()
    def mean_weights(self, num: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        """Serving weights [B, K]: the policy mean mu (deterministic per request)."""
        return self(num, cat)[0]


class ServingPolicy(nn.Module):
    """The TorchScript serving module: (num, cat) -> weights [B, K]; ``dirichlet(num, cat)`` -> (mu [B, K],
    kappa [B]) and ``alpha_floor()`` for serving's exploration (grade.model.exploration)."""

    def __init__(self, policy: PolicyNet):
        super().__init__()
        self.policy = policy

    def forward(self, num: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        mu, _ = self.policy(num, cat)
        return mu

    @torch.jit.export
    def dirichlet(self, num: torch.Tensor, cat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy(num, cat)

    @torch.jit.export
    def alpha_floor(self) -> float:
        return self.policy.alpha_floor


# ------------------------------------------------------------------------------------------------
# Persistence: safetensors + JSON, local paths or s3:// URIs
# ------------------------------------------------------------------------------------------------

def save_policy(model: PolicyNet, folder: str | Path) -> None:
    """Write ``policy.safetensors`` and ``policy.json`` into a local folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "grade-policy-v1"})
    (folder / CONFIG_FILE).write_text(
        json.dumps(dataclasses.asdict(model.cfg), indent=2, sort_keys=True) + "\n")


def load_policy(uri: str | Path) -> PolicyNet:
    """Load a policy saved by :func:`save_policy` from a local folder or an ``s3://`` prefix."""
    from safetensors.torch import load as load_safetensors

    from grade.core.errors import InputError

    uri = str(uri)
    try:
        cfg_dict = json.loads(store.read_bytes(store.join(uri, CONFIG_FILE)))
        state = load_safetensors(store.read_bytes(store.join(uri, WEIGHTS_FILE)))
    except store.NotFound as e:
        raise InputError(f"{uri}: not a policy folder ({e}); expected {WEIGHTS_FILE} and "
                         f"{CONFIG_FILE}") from None
    try:
        cfg = PolicyConfig(**cfg_dict)
    except TypeError as e:
        raise InputError(f"{store.join(uri, CONFIG_FILE)}: invalid policy config: {e}") from None
    model = PolicyNet(cfg)
    model.load_state_dict(state)
    model.eval()
    return model


@contextmanager
def published_model(uri: str | Path) -> Iterator[Path]:
    """A local folder with the published model folder (or registry version) at ``uri`` while in the block.

    Every file is checked against the folder's manifest (:func:`grade.core.store.open_published`): a
    folder without one raises ``NotPublished`` naming it, a changed or missing file ``IntegrityError``
    (both exit 2). A local folder is used in place; an S3 one is downloaded to a temporary folder
    that is removed on leaving the block.
    """
    with tempfile.TemporaryDirectory(prefix="grade-fetch-") as scratch:
        yield Path(store.open_published(str(uri), cache_dir=scratch))


def load_published_policy(uri: str | Path) -> PolicyNet:
    """:func:`load_policy` of a published model folder, its files verified (:func:`published_model`)."""
    with published_model(uri) as folder:
        return load_policy(folder)


def export_torchscript(model: PolicyNet, path: str | Path) -> None:
    """Save the scripted serving module (features -> weights) to a local file, and beside it
    (:data:`PROBE_FILE`) a probe batch with the weights ``model`` gives it: a server checks the
    loaded module against them before it serves the version."""
    from safetensors.torch import save_file

    scripted = torch.jit.script(ServingPolicy(model).eval())
    torch.jit.save(scripted, str(path))
    num, cat = probe_inputs(model.cfg)
    save_file({"num": num, "cat": cat, "weights": model.eval().mean_weights(num, cat).contiguous()},
              str(Path(path).parent / PROBE_FILE), metadata={"format": "grade-policy-probe-v1"})


def probe_inputs(cfg: PolicyConfig, rows: int = PROBE_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch (num [rows, U] standard normal, cat [rows, C] ids across each vocabulary, the
    out-of-vocabulary id 0 included) of the inputs of a policy of ``cfg``."""
    g = torch.Generator().manual_seed(0)
    num = torch.randn(rows, cfg.n_numeric, generator=g)
    cat = torch.stack([torch.arange(rows) * max(1, n // rows) % n for n in cfg.cat_sizes], dim=1) \
        if cfg.cat_sizes else torch.zeros(rows, 0, dtype=torch.int64)
    return num, cat.to(torch.int64)


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    return torch.jit.load(str(path), map_location="cpu")
