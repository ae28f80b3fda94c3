"""The two multistep solvers with their own time variables: UniPC (in VP space) and DEIS ("tab" coefficients).

Both follow ComfyUI's formulation: UniPC treats σ itself as the continuous time of a VP process
(α = 1/√(1+σ²)), replaces a final σ = 0 by 0.001 and divides the result by α at the end; DEIS maps σ to the
time of a fixed VP-SDE (β from σ_min = 0.002, σ_max = 80) and integrates Lagrange polynomials of the
derivative history numerically (10 000-point Riemann sums).
"""

from __future__ import annotations

import torch


def _expand(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


# --- UniPC ---------------------------------------------------------------------------------------------------

def _log_alpha(sigma: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.log(1 / ((sigma * sigma) + 1))


def _alpha(sigma: torch.Tensor) -> torch.Tensor:
    return torch.exp(_log_alpha(sigma))


def _vp_std(sigma: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(1.0 - torch.exp(2.0 * _log_alpha(sigma)))


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    log_alpha = _log_alpha(sigma)
    return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))


class _UniPC:
    def __init__(self, model, extra_args: dict, variant: str):
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"UniPC variant must be bh1 or bh2, not {variant!r}")
        self.model = model
        self.extra_args = extra_args
        self.variant = variant

    def data_prediction(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 from the VE denoiser, through ComfyUI's noise-prediction detour (same rounding path)."""
        sigma = _expand(t, x.ndim)
        x_ve = x * ((sigma ** 2 + 1.0) ** 0.5)
        eps = (x_ve - self.model(x_ve, t, **self.extra_args)) / sigma
        return (x - _expand(_vp_std(t), x.ndim) * eps) / _expand(_alpha(t), x.ndim)

    def update(self, x, model_history, t_history, t, order, use_corrector):
        """One UniPC step to t: the predictor (UniP) and, when asked, the corrector (UniC) with a new evaluation."""
        ndim = x.ndim
        t_prev = t_history[-1]
        lambda_prev, lambda_t = _lambda(t_prev), _lambda(t)
        model_prev = model_history[-1]
        sigma_prev, sigma_t = _vp_std(t_prev), _vp_std(t)
        alpha_t = _alpha(t)
        h = lambda_t - lambda_prev

        rk_list, d1s = [], []
        for i in range(1, order):
            rk = ((_lambda(t_history[-(i + 1)]) - lambda_prev) / h)[0]
            rk_list.append(rk)
            d1s.append((model_history[-(i + 1)] - model_prev) / rk)
        rk_list.append(torch.ones((), dtype=h.dtype, device=h.device))
        rks = torch.stack(rk_list)

        hh = -h[0]  # data-prediction form integrates in −λ
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial = 1
        b_h = hh if self.variant == "bh1" else torch.expm1(hh)
        rows, b_terms = [], []
        for i in range(1, order + 1):
            rows.append(torch.pow(rks, i - 1))
            b_terms.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        R = torch.stack(rows)
        b = torch.stack(b_terms)

        d1_stack = torch.stack(d1s, dim=1) if d1s else None
        x_linear = _expand(sigma_t / sigma_prev, ndim) * x - _expand(alpha_t * h_phi_1, ndim) * model_prev
        pred_res: torch.Tensor | float
        if d1_stack is not None:
            rhos_p = torch.tensor([0.5], device=b.device) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
            pred_res = torch.einsum("k,bk...->b...", rhos_p.to(d1_stack.dtype), d1_stack)
        else:
            pred_res = 0
        x_t = x_linear - _expand(alpha_t * b_h, ndim) * pred_res

        model_t = None
        if use_corrector:
            rhos_c = torch.tensor([0.5], device=b.device) if order == 1 else torch.linalg.solve(R, b)
            model_t = self.data_prediction(x_t, t)
            corr_res: torch.Tensor | float = 0
            if d1_stack is not None:
                corr_res = torch.einsum("k,bk...->b...", rhos_c[:-1].to(d1_stack.dtype), d1_stack)
            x_t = x_linear - _expand(alpha_t * b_h, ndim) * (corr_res + rhos_c[-1] * (model_t - model_prev))
        return x_t, model_t


def uni_pc(model, x, sigmas, extra_args=None, callback=None, variant="bh1"):
    """UniPC multistep (order min(3, steps − 1), lower order at the end), data prediction."""
    extra_args = extra_args or {}
    times = sigmas.clone()
    if times[-1] == 0:
        times[-1] = 0.001
    steps = len(times) - 1
    if steps < 1:
        return x
    solver = _UniPC(model, extra_args, variant)
    order = max(1, min(3, steps - 1))
    x = x / torch.sqrt(1.0 + times[0] ** 2.0)

    t0 = times[0].expand(x.shape[0])
    model_history = [solver.data_prediction(x, t0)]
    t_history = [t0]
    for init_order in range(1, order):
        t = times[init_order].expand(x.shape[0])
        x, model_x = solver.update(x, model_history, t_history, t, init_order, use_corrector=True)
        if model_x is None:
            model_x = solver.data_prediction(x, t)
        model_history.append(model_x)
        t_history.append(t)
        if callback is not None:
            callback(init_order - 1, model_history[-2], x)
    for step in range(order, steps + 1):
        t = times[step].expand(x.shape[0])
        step_order = min(order, steps + 1 - step)
        x, model_x = solver.update(x, model_history, t_history, t, step_order, use_corrector=step != steps)
        last_denoised = model_history[-1]
        for i in range(order - 1):
            t_history[i] = t_history[i + 1]
            model_history[i] = model_history[i + 1]
        t_history[-1] = t
        if step < steps:  # the final step's model value would never be used
            if model_x is None:
                model_x = solver.data_prediction(x, t)
            model_history[-1] = model_x
        if callback is not None:
            callback(step - 1, last_denoised, x)
    return x / _alpha(times[-1])


# --- DEIS ----------------------------------------------------------------------------------------------------

def _deis_vp_times(sigmas: torch.Tensor, epsilon_s: float = 1e-3, sigma_min: float = 0.002,
                   sigma_max: float = 80.0):
    """σ → time of a VP-SDE with linear β(t) = β0 + (β1 − β0)t fitted to [sigma_min, sigma_max]."""
    log_min = torch.log(torch.tensor(sigma_min) ** 2 + 1)
    log_max = torch.log(torch.tensor(sigma_max) ** 2 + 1)
    beta_d = 2 * (log_min / epsilon_s - log_max) / (epsilon_s - 1)
    beta_min = log_max - 0.5 * beta_d
    beta_d, beta_min = beta_d.to(sigmas.device), beta_min.to(sigmas.device)
    times = ((beta_min ** 2 + 2 * beta_d * (sigmas ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    return times, beta_min, beta_d + beta_min


def _deis_coefficients(sigmas: torch.Tensor, max_order: int, points: int = 10000) -> list[list[torch.Tensor]]:
    times, beta_0, beta_1 = _deis_vp_times(sigmas)
    coefficients: list[list[torch.Tensor]] = []
    for i in range(len(times) - 1):
        order = min(i + 1, max_order)
        if order == 1 or sigmas[i + 1] <= 0:
            coefficients.append([])
            continue
        t_cur, t_next = times[i], times[i + 1]
        taus = torch.linspace(float(t_cur), float(t_next), points, device=times.device)
        dtau = (t_next - t_cur) / points
        alpha = torch.exp(-0.5 * taus ** 2 * (beta_1 - beta_0) - taus * beta_0)
        d_log_alpha = -taus * (beta_1 - beta_0) - beta_0
        integrand = -0.5 * d_log_alpha / torch.sqrt(alpha * (1 - alpha))  # = dσ/dτ
        previous = times[[i - k for k in range(order)]]
        row = []
        for j in range(order):
            basis = torch.ones_like(taus)
            for k in range(order):
                if k != j:
                    basis = basis * ((taus - previous[k]) / (previous[j] - previous[k]))
            row.append(torch.sum(integrand * basis) * dtau)
        coefficients.append(row)
    return coefficients


def deis(model, x, sigmas, extra_args=None, callback=None, max_order=3):
    """DEIS: explicit multistep on d = (x − D)/σ with coefficients integrated in VP time."""
    extra_args = extra_args or {}
    coefficients = _deis_coefficients(sigmas, max_order)
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * x.new_ones([x.shape[0]]), **extra_args)
        if callback is not None:
            callback(i, denoised, x)
        d = (x - denoised) / sigma
        order = 1 if sigma_next <= 0 else min(max_order, i + 1)
        if order == 1:
            x_next = x + (sigma_next - sigma) * d
        else:
            x_next = x + coefficients[i][0] * d
            for k in range(1, order):
                x_next = x_next + coefficients[i][k] * history[-k]
        history = (history + [d])[-(max_order - 1):]
        x = x_next
    return x
