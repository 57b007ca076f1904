"""How far an MPRAGE's contrast can tell a tissue's T1: log-sensitivities of the k-space-centre signal to T1.

An MPRAGE has an unknown receive gain, so only ratios of tissue signals carry information. White matter's
absolute T1 then needs a reference tissue of known T1 and PD: with signal S_t = g PD_t f(T1_t), holding a measured
ratio S_ref / S_wm fixed, an error d ln T1_ref in the reference's assumed T1 becomes an error
(s_ref / s_wm) d ln T1_ref in white matter's, where s = d ln f / d ln T1. Likewise an error in the PD ratio
becomes an error of (1 / |s_wm|) times its size. A change of every tissue's T1 by the same factor k moves a
ratio only by (s_ref - s_wm) ln k.

The signal model is the independent simulator's (research/indep_phantom: the periodic steady state of the
whole echo train, centre echo), on its six protocols and tissue means.

Usage: ``python -m research.mprage_sensitivity``.
"""

from __future__ import annotations

import numpy as np

from research.indep_phantom.make_indep import PROTOCOLS, TISSUE_MEANS, Protocol, centre_echo, train_mz


def centre_signal(t1_ms: float, protocol: Protocol) -> float:
    """|Mz| before the k-space-centre echo (M0 = 1): the centre echo's signal up to sin(flip) and T2* decay."""
    return float(np.abs(train_mz(np.array([t1_ms]), protocol)[0, centre_echo(protocol)]))


def log_sensitivity(t1_ms: float, protocol: Protocol, step: float = 0.01) -> float:
    """d ln S / d ln T1 at ``t1_ms`` by a central difference in ln T1."""
    up, down = centre_signal(t1_ms * np.exp(step), protocol), centre_signal(t1_ms * np.exp(-step), protocol)
    return float((np.log(up) - np.log(down)) / (2 * step))


def main() -> None:
    """Print, per protocol, the sensitivities and the white-matter T1 error each reference's uncertainty implies."""
    print("| protocol | S_CSF / S_WM | d ln S / d ln T1: WM / GM / CSF | WM T1 error per 10 % error in CSF T1 | "
          "per 10 % in GM T1 | per 5 % in PD_WM | GM / WM ratio change for every T1 x 0.87 |")
    print("|---|---|---|---|---|---|---|")
    for p in PROTOCOLS:
        means = TISSUE_MEANS[p.field_t]
        (wm, _, pd_wm), (gm, _, _), (csf, _, _) = means["wm"], means["gm"], means["csf"]
        s_wm, s_gm, s_csf = (log_sensitivity(t, p) for t in (wm, gm, csf))
        ratio = centre_signal(csf, p) / (pd_wm * centre_signal(wm, p))
        shift = (centre_signal(0.87 * gm, p) / centre_signal(0.87 * wm, p)) / (centre_signal(gm, p)
                                                                             / centre_signal(wm, p))
        print(f"| {p.key} | {ratio:.2f} | {s_wm:+.2f} / {s_gm:+.2f} / {s_csf:+.2f} | {10 * abs(s_csf / s_wm):.1f} % | "
              f"{10 * abs(s_gm / s_wm):.1f} % | {5 / abs(s_wm):.1f} % | {100 * (shift - 1):+.1f} % |")


if __name__ == "__main__":
    main()
