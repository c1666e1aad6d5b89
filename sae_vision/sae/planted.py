"""Planted dictionaries: synthetic activations with known atoms, shaped like a post-ReLU conv layer.

x = ReLU(offset + Σ_i c_i a_i + noise), where
  - the atoms a_i are random unit directions in R^D (the ground truth an SAE should find);
  - feature i fires with a power-law frequency p_i ∝ (i + 1)^-alpha, scaled so that on average
    `k_mean` atoms are active per vector (a few common features, a long tail of rare ones);
  - atoms come in correlated groups: when a group's latent cause fires, each member fires with
    probability `group_coupling`, on top of its own independent draws; causes follow their
    members' frequencies and carry `group_frac` of all firings, so rare groups stay rare;
  - coefficients are positive (exponential magnitudes around 1), and the non-negative offset
    plus the final clipping at zero make the data non-negative with a large mean, as after a ReLU.

The clipping bends directions, so even a perfect SAE does not reach cosine 1 with every atom;
that is deliberate (a real layer's features are not clean linear directions either).
Scores: `mmcs` (mean over atoms of the best cosine with any decoder row) and `recovered_frac`
(atoms whose best cosine exceeds 0.9).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PlantedSpec:
    """The knobs of a planted dictionary (the defaults are the benchmark's)."""

    d_in: int = 128  # activation width D
    n_atoms: int = 512  # planted features
    k_mean: float = 16.0  # mean number of active atoms per vector
    alpha: float = 1.0  # power-law exponent of the firing frequencies
    group_size: int = 4  # atoms per correlated group
    group_frac: float = 0.3  # share of all firings that come from group causes
    group_coupling: float = 0.6  # P(member fires | its group's cause fired)
    offset: float = 1.0  # mean of the non-negative offset per coordinate, in units of the signal's std
    noise: float = 0.05  # Gaussian noise std per coordinate, in units of the signal's std
    seed: int = 0


@dataclass(frozen=True)
class Planted:
    """A planted dictionary: its atoms, offset and per-atom firing probabilities."""

    spec: PlantedSpec
    atoms_AD: Tensor  # unit-norm rows
    offset_D: Tensor
    freq_A: Tensor  # independent firing probability of each atom
    cause_G: Tensor  # firing probability of each group's latent cause
    signal_std: float  # per-coordinate std of Σ c_i a_i, the unit of offset and noise

    def sample(self, n: int, seed: int, chunk: int = 16_384) -> Tensor:
        """n vectors [n, D] (float32), reproducible from `seed`; built in chunks of rows, so
        memory stays at [chunk, n_atoms] whatever n is."""
        parts = [self.sample_with_codes(min(chunk, n - lo), seed * 1_000_003 + i)[0]
                 for i, lo in enumerate(range(0, n, chunk))]
        return torch.cat(parts) if parts else torch.zeros(0, self.spec.d_in)

    def sample_with_codes(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """(x [n, D], the coefficients [n, A] that made it)."""
        s = self.spec
        gen = torch.Generator().manual_seed(_stream_seed(self.spec.seed, seed))
        n_atoms = self.atoms_AD.shape[0]
        fire = torch.rand(n, n_atoms, generator=gen) < self.freq_A
        n_groups = (n_atoms + s.group_size - 1) // s.group_size
        cause = torch.rand(n, n_groups, generator=gen) < self.cause_G
        cause_A = cause.repeat_interleave(s.group_size, dim=1)[:, :n_atoms]
        fire |= cause_A & (torch.rand(n, n_atoms, generator=gen) < s.group_coupling)
        mags = -torch.log(torch.rand(n, n_atoms, generator=gen).clamp_min(1e-12))  # Exp(1)
        codes = torch.where(fire, 0.5 + mags, 0.0)
        noise = torch.randn(n, s.d_in, generator=gen) * (s.noise * self.signal_std)
        x = (codes @ self.atoms_AD + self.offset_D + noise).clamp_min(0.0)
        return x.float(), codes.float()


def _stream_seed(spec_seed: int, stream: int) -> int:
    """A seed for one stream of a planted dictionary that never equals a plain small seed.

    With `manual_seed(spec.seed)` itself, an SAE initialised under torch.manual_seed(0) would
    start with decoder rows equal to the atoms of a seed-0 dictionary.
    """
    import numpy as np

    mixed = np.random.SeedSequence([int(spec_seed), int(stream) + 2, 0x5AE5EED])
    return int(mixed.generate_state(1, np.uint64)[0] >> 1)


def make_planted(spec: PlantedSpec | None = None) -> Planted:
    """Draw the atoms, offset and frequencies of a planted dictionary from `spec.seed`."""
    s = spec or PlantedSpec()
    gen = torch.Generator().manual_seed(_stream_seed(s.seed, -1))
    atoms = torch.randn(s.n_atoms, s.d_in, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    # E c² = E (0.5 + Exp(1))² = 3.25; k_mean active unit atoms spread over D coordinates.
    signal_std = (s.k_mean * 3.25 / s.d_in) ** 0.5
    offset = torch.rand(s.d_in, generator=gen) * (2 * s.offset * signal_std)  # U(0, 2 offset σ)
    raw = (torch.arange(s.n_atoms, dtype=torch.float64) + 1.0) ** -s.alpha
    raw = raw[torch.randperm(s.n_atoms, generator=gen)]  # frequency rank is not atom index
    p_A = raw / raw.sum()  # share of all firings per atom
    freq = (p_A * (1 - s.group_frac) * s.k_mean).clamp(max=0.5).float()
    n_groups = (s.n_atoms + s.group_size - 1) // s.group_size
    pad = torch.zeros(n_groups * s.group_size, dtype=torch.float64)
    pad[: s.n_atoms] = p_A
    # A cause fires all its members w.p. group_coupling: expected firings = cause x size x coupling.
    cause = pad.view(n_groups, s.group_size).sum(1) * s.group_frac * s.k_mean
    cause = (cause / (s.group_size * s.group_coupling)).clamp(max=0.5).float()
    return Planted(s, atoms, offset, freq, cause, float(signal_std))


@torch.no_grad()
def recovery(atoms_AD: Tensor, dec_FD: Tensor, threshold: float = 0.9) -> dict:
    """{'mmcs', 'recovered_frac'}: each atom's best cosine with any decoder row."""
    a = atoms_AD.double() / atoms_AD.double().norm(dim=1, keepdim=True)
    d = dec_FD.detach().double().cpu()
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best = (a @ d.t()).max(1).values
    return {"mmcs": float(best.mean()), "recovered_frac": float((best > threshold).float().mean())}
