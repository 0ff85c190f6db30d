"""Optimal Kronecker-Sum Approximation of Real Time Recurrent Learning (OK), in numpy and Numba.

F. Benzing, M. M. Gauy, A. Mujika, A. Martinsson, A. Steger. "Optimal Kronecker-Sum Approximation
of Real Time Recurrent Learning". ICML 2019, arXiv:1902.03993. "§n" below names a section of this
module; "§3.k" is step k of the OK step listed here. docs/math.md gives the derivations at length.

Real Time Recurrent Learning (RTRL) carries the influence G_t = dh_t/dW forward in time, which
gives exact online gradients at the price of n*m*2n numbers per stream (§2). OK stores G as a sum
of r Kronecker products u_k (x) A_k. Each step adds one new product, a_t (x) D_t, and OK replaces
the resulting r+1 terms by r terms chosen at random so that the estimate stays unbiased and its
variance is the least possible. KF-RTRL and UORO (§5) are other unbiased reductions with more
noise; exact RTRL and (T)BPTT are the references.

One OK step (§3, the paper's Algorithm 1 with its Opt, §4), per stream:
  1. Terms: (u_k, H_t A_k) for k <= r and (a_t, D_t); their sum is exactly H_t G_{t-1} + F_t.
  2. Factor each side, terms^T = Q R with orthonormal Q (m x (r+1) and 2n^2 x (r+1)), by the
     Gram-and-rotate factorisation (§3a): Gram = terms terms^T = E diag(lambda) E^T in float64,
     Y = E^T terms (rows orthogonal), s_i = ||Y_i|| measured on Y, Q = Y^T diag(1/s), R = diag(s)
     E^T. Q R = terms^T for any s since E is orthogonal, so OK is unbiased whatever the rounding;
     s measured on Y rather than as sqrt(lambda) resolves directions far below sqrt(eps) of the
     largest (variance V_min on rank-deficient input too). A side shorter than its r+1 terms
     (tiny networks): Householder QR, Q padded with zero columns and R with zero rows.
  3. C = R_u R_A^T ((r+1) x (r+1)): sum_k u_k (x) A_k = Q_u C Q_A^T. SVD C = U diag(sigma) V^T.
     Sign convention: each pair (U_i, V_i) is flipped so that the largest-magnitude entry of
     Q_u U_i (lowest index on exact ties) is positive; then the realised factors do not depend
     on the signs LAPACK (or the Gram's eigenvectors) chose, only on sigma's distinctness.
  4. Opt (§4) draws X (r+1 x r) with E[X X^T] = diag(sigma) and the least E||X X^T - diag||^2:
     keep sigma_1..sigma_p exactly (x_i = sqrt(sigma_i) e_i), where p is the smallest index with
     (r - p) sigma_{p+1} <= S = sum_{i>p} sigma_i; spread the other r+1-p values over q = r - p
     terms as c (I - v v^T), c = S / q, v_i = +-sqrt(1 - sigma_i / c) with random signs: a unit
     vector whose squared entries average to 1 - sigma_i / c, so the mean is diag(sigma).
     The paper's theorem: no unbiased rank-r replacement has less variance than
     V_min = S^2 / q - sum_{i>p} sigma_i^2, and Opt reaches it. Because the Q's are
     orthonormal, the same V_min bounds E||G' - G||^2 over all unbiased rank-r Kronecker sums.
  5. New factors u'_j = Q_u U x_j, A'_j = Q_A V x_j: the same x_j on both sides (the symmetric
     split) gives ||u'_j|| = ||A'_j|| and reaches V_min; the paper's released code divides one
     side by sqrt(sigma) and multiplies the other, which stays unbiased but not minimal.
  6. dL_t/dW = sum_j outer(u'_j, q_t A'_j); W_out gets its exact gradient.

Notation (B streams lead every batched array; sizes n, m, r, B, T, V, O):

    paper          code          shape                      meaning
    x_t, y_t       x, y          (B,), (B,) ints            input and target symbols
    h_t, z_t       h, z          (B, n), (B, 2n)            state, pre-activation [z_c, z_f]
    a_t            a             (B, m)                     [onehot(x_t), h_{t-1}, 1],  m = V + n + 1
    W, W_out       W, W_out      (m, 2n), (n + 1, O)        cell and read-out weights (last row: bias)
    f, c', f'      f, alpha/beta (B, n)                     carry gate; alpha = (1-f) c', beta = (h_{t-1}-c) f'
    H_t, D_t       H, D          (B, n, n), (B, n, 2n)      dh_t/dh_{t-1}, dh_t/dz_t = [diag(alpha), diag(beta)]
    q_t            q             (B, n)                     dL_t/dh_t (of the batch-mean loss)
    G_t            G             (B, n, m, 2n)              influence dh_t/dW (exact RTRL)
    u_k, A_k       us, As        (B, r, m), (B, r, n, 2n)   Kronecker factors: G[i,l,j] ~ sum_k u_k[l] A_k[i,j]
    (§3a)          E, s, Y       (B, r+1, r+1), (B, r+1),   Gram eigenvectors, row norms of Y = E^T terms
                                 (B, r+1, d)                (Y replaces the terms in place, d = m or 2n^2)
    Q, R           (implicit)    Q = Y^T diag(1/s)          R = diag(s) E^T; Q is never formed
    C, sigma       C, sigma      (B, r+1, r+1), (B, r+1)    C = R_u R_A^T and its singular values, descending
    U, V           U, Vt         (B, r+1, r+1) each         C's singular vectors, Vt = V^T; signs: max|Q_u U_i| > 0
    V_min          min_variance  scalar                     least variance of any unbiased rank-r reduction
    s, theta       s, theta      (B, n), (B, m, 2n)         UORO's factors: G ~ s (x) theta

Layout: §1 cell, §2 exact RTRL and BPTT, §3 OK with §3a its factorisation, §4 Opt, §5 baselines,
§6 threads, then the online learner interface shared by the runners, whole-sequence gradients,
and training.
"""
import os
from concurrent.futures import ThreadPoolExecutor, wait
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
from numba import njit
from threadpoolctl import ThreadpoolController

METHODS = ("rtrl", "ok", "kf", "kf-avg", "uoro")  # online learners; "bptt" is offline
UORO_EPS = 1e-7  # UORO's epsilon in its rescaling factors (Tallec and Ollivier 2017)
INIT_STD = 0.01  # weight initialisation N(0, 0.01^2), as the paper's code


# --- 1. The recurrent highway cell ----------------------------------------------------------------


class Params(NamedTuple):
    """W (m, 2n): rows [input, hidden, bias], columns [candidate, carry gate]. W_out (n + 1, O)."""

    W: np.ndarray
    W_out: np.ndarray


def init_params(n_in, n_hidden, n_out, rng, dtype=np.float32):
    """Every weight, biases included, from N(0, INIT_STD^2) as the paper's code does."""
    for name, size in (("n_in", n_in), ("n_hidden", n_hidden), ("n_out", n_out)):
        _check_positive_int(name, size)
    W = rng.normal(0.0, INIT_STD, size=(n_in + n_hidden + 1, 2 * n_hidden))
    W_out = rng.normal(0.0, INIT_STD, size=(n_hidden + 1, n_out))
    return Params(W.astype(dtype), W_out.astype(dtype))


def sizes(params):
    """(V, n, O): input symbols, hidden units, output symbols."""
    n = params.W.shape[1] // 2
    return params.W.shape[0] - n - 1, n, params.W_out.shape[1]


@njit(cache=True)
def _gates(z, h_prev):
    """Elementwise part of one cell step (§1): h = f * h_prev + (1 - f) * c.

    z (B, 2n), h_prev (B, n) -> h, f, alpha, beta, each (B, n), where c = 2 sigmoid(z_c) - 1,
    f = sigmoid(z_f), alpha = dh/dz_c = (1 - f) c' and beta = dh/dz_f = (h_prev - c) f'.
    """
    B, n = h_prev.shape
    h = np.empty_like(h_prev)
    f = np.empty_like(h_prev)
    alpha = np.empty_like(h_prev)
    beta = np.empty_like(h_prev)
    for b in range(B):
        for i in range(n):
            s = 1.0 / (1.0 + np.exp(-z[b, i]))  # exp overflows to inf, s to 0: no NaN
            c = 2.0 * s - 1.0
            g = 1.0 / (1.0 + np.exp(-z[b, n + i]))
            h[b, i] = g * h_prev[b, i] + (1.0 - g) * c
            f[b, i] = g
            alpha[b, i] = (1.0 - g) * 2.0 * s * (1.0 - s)
            beta[b, i] = (h_prev[b, i] - c) * g * (1.0 - g)
    return h, f, alpha, beta


def cell_step(W, x, h_prev):
    """One step of the cell (§1): a_t = [onehot(x_t), h_{t-1}, 1], z_t = a_t W, h_t.

    W (m, 2n), x (B,) ints, h_prev (B, n) -> h (B, n), a (B, m), f, alpha, beta (B, n).
    """
    B, n = h_prev.shape
    V = W.shape[0] - n - 1
    a = np.zeros((B, V + n + 1), dtype=W.dtype)
    a[np.arange(B), x] = 1.0
    a[:, V:V + n] = h_prev
    a[:, -1] = 1.0
    z = a @ W  # (B, 2n)
    h, f, alpha, beta = _gates(z, np.ascontiguousarray(h_prev))
    return h, a, f, alpha, beta


def jacobians(W, f, alpha, beta):
    """H_t = dh_t/dh_{t-1} (B, n, n) and D_t = dh_t/dz_t (B, n, 2n) of §1: H = diag(f) +
    diag(alpha) W_hc^T + diag(beta) W_hf^T, D = [diag(alpha), diag(beta)]."""
    (B, n), V = f.shape, W.shape[0] - f.shape[1] - 1
    W_hc_T, W_hf_T = (np.ascontiguousarray(W[V:V + n, j:j + n].T) for j in (0, n))  # hidden rows
    H, D = np.empty((B, n, n), W.dtype), np.zeros((B, n, 2 * n), W.dtype)
    _by_streams(lambda s: _jacobians(W_hc_T, W_hf_T, f[s], alpha[s], beta[s], H[s], D[s]), B)
    return H, D


@njit(cache=True, nogil=True)
def _jacobians(W_hc_T, W_hf_T, f, alpha, beta, H, D):
    """jacobians' loops, into H and D (D zero): H[b, i] = alpha[b, i] W_hc^T[i] + beta[b, i]
    W_hf^T[i] + f[b, i] e_i and D[b, i] = alpha[b, i] e_i + beta[b, i] e_{n+i}, written once each.
    At the PTB configuration numpy's temporaries of H's size took 10-20 ms; this takes 2-4 ms."""
    B, n = f.shape
    for b in range(B):
        for i in range(n):
            a, c = alpha[b, i], beta[b, i]
            for j in range(n):
                H[b, i, j] = a * W_hc_T[i, j] + c * W_hf_T[i, j]
            H[b, i, i] += f[b, i]
            D[b, i, i] = a
            D[b, i, n + i] = c


def readout(W_out, h, y):
    """Softmax read-out y_t = softmax([h_t, 1] W_out) and its cross-entropy (§1).

    W_out (n + 1, O), h (B, n), y (B,) ints -> losses (B,) in nats, and dlogits (B, O) =
    softmax - onehot(y), the gradient of each stream's own loss with respect to its logits.
    """
    B = h.shape[0]
    logits = h @ W_out[:-1] + W_out[-1]  # (B, O)
    logits = logits - logits.max(axis=1, keepdims=True)  # log-sum-exp shift: exp stays <= 1
    log_norm = np.log(np.exp(logits).sum(axis=1))  # (B,)
    losses = log_norm - logits[np.arange(B), y]
    dlogits = np.exp(logits - log_norm[:, None])
    dlogits[np.arange(B), y] -= 1.0
    return losses, dlogits


def _output_grads(W_out, h, dlogits):
    """Gradients of the batch-mean loss: q = dL/dh (B, n) and the exact dL/dW_out (n + 1, O)."""
    B = h.shape[0]
    dlogits = dlogits / B
    q = dlogits @ W_out[:-1].T  # (B, n)
    dW_out = np.vstack([h.T @ dlogits, dlogits.sum(axis=0)])  # [h, 1]^T dlogits
    return q, dW_out


# --- 2. Exact RTRL and BPTT -----------------------------------------------------------------------


class RTRLState(NamedTuple):
    G: np.ndarray  # (B, n, m, 2n) influence dh_t/dW


def _rtrl_update(state, a, H, D):
    """Exact RTRL: G_t = H_t G_{t-1} + F_t with F_t[i, l, j] = a_t[l] D_t[i, j] (§2)."""
    G = state.G
    B, n, m, two_n = G.shape
    HG = _products(H, G.reshape(B, n, m * two_n)).reshape(G.shape)  # (B, n, m, 2n)
    return RTRLState(HG + np.einsum("bl,bij->bilj", a, D))


def bptt(params, xs, ys, h0=None, resets=None):
    """Exact backpropagation through time over xs, ys (T, B), from h0 (B, n) or zeros.

    resets (T, B) bool, optional: stream b starts afresh (h = 0) at step t, so no gradient flows
    into earlier steps. Returns (losses, dW, dW_out, h_T): losses (T,) the batch-mean cross-entropy
    of each step, (dW, dW_out) the gradient of their sum. Called once per window with h0 = the last
    window's h_T, this is TBPTT-k (§5; see tbptt_update).
    """
    W, W_out = params
    V, n, O = sizes(params)
    xs, ys = _check_sequences(xs, ys, V, O)
    T, B = xs.shape
    h = np.zeros((B, n), W.dtype) if h0 is None else _check_state("h0", h0, (B, n), W.dtype)
    _check_finite_params(params)
    _check_finite("h0", h)
    if resets is not None:
        resets = np.asarray(resets, dtype=bool)
        if resets.shape != (T, B):
            raise ValueError(f"resets must have shape {(T, B)} like xs, got {resets.shape}")
    step_losses, dW_out = np.empty(T), np.zeros_like(W_out)
    tape, qs = [], np.empty((T, B, n), W.dtype)
    for t in range(T):  # forward, keeping what the backward pass needs
        if resets is not None:
            h = np.where(resets[t][:, None], 0.0, h).astype(W.dtype)
        h, a, f, alpha, beta = cell_step(W, xs[t], h)
        losses, dlogits = readout(W_out, h, ys[t])
        qs[t], dW_out_t = _output_grads(W_out, h, dlogits)
        step_losses[t] = losses.mean()
        dW_out += dW_out_t
        tape.append((a, f, alpha, beta))
    dW, dh = np.zeros_like(W), np.zeros((B, n), W.dtype)
    W_h = W[V:V + n]  # (n, 2n): how h_{t-1} enters z_t
    for t in reversed(range(T)):
        a, f, alpha, beta = tape[t]
        dh = dh + qs[t]  # dL/dh_t: from the read-out at t and from step t+1
        dz = np.hstack([dh * alpha, dh * beta])  # (B, 2n) = dh D_t
        dW += a.T @ dz
        dh = dh * f + dz @ W_h.T  # dL/dh_{t-1} = dL/dh_t H_t
        if resets is not None:
            dh[resets[t]] = 0.0  # those streams read zeros, not h_{t-1}
    return step_losses, dW, dW_out, h


# --- 3. One step of OK (the paper's Algorithm 1) --------------------------------------------------


class KronState(NamedTuple):
    us: np.ndarray  # (B, r, m)
    As: np.ndarray  # (B, r, n, 2n)


def _ok_update(state, a, H, D, signs):
    """One OK step for all streams (§3): add a_t (x) D_t to H_t G_{t-1}, reduce r+1 -> r."""
    us, As = state
    B, r = us.shape[:2]
    U_terms, A_terms = _next_slot(us), _next_slot(As)  # (B, r+1, m), (B, r+1, n, 2n)

    def ok_step(s):  # the streams s, in one thread (§6)
        # 1. The r+1 terms (u_k, H A_k) and (a_t, D_t); their sum is exactly H_t G_{t-1} + F_t.
        U_terms[s, :r] = us[s]
        U_terms[s, r] = a[s]
        np.matmul(H[s, None], As[s], out=A_terms[s, :r])  # the r products H A_k: the floor
        A_terms[s, r] = D[s]
        _ok_reduce_batch(U_terms[s], A_terms[s], signs[s])  # 2-5, in place

    _by_streams(ok_step, B)
    return KronState(U_terms[:, :r], A_terms[:, :r])


def _next_slot(factors):
    """Where the next step's r+1 terms go: the other half of the state's two-slot buffer.

    init_learner puts OK's factors (B, r, ...) in slot 0 of a (2, B, r+1, ...) buffer; each step
    computes its terms, then its new factors, in place in the other slot (fresh arrays of tens of
    MB cost a page fault per 4 kB on first write: at the paper's sizes, as long as the products).
    The state from two steps back is overwritten: learner_step consumes the state it is given.
    """
    B, r = factors.shape[:2]
    slots = factors.base  # the buffer a view of init_learner's or of this function lives in
    shape = (2, B, r + 1) + factors.shape[2:]
    if slots is None or slots.shape != shape or slots.dtype != factors.dtype:
        return np.empty(shape, factors.dtype)[0]  # a state made elsewhere: start a new buffer
    return slots[1] if np.may_share_memory(factors, slots[0]) else slots[0]


def _ok_reduce_batch(us, As, signs):
    """Steps 2-5 of §3 for B streams: us (B, r+1, m), As (B, r+1, n, k) -> r terms each.

    In place: the new factors are us[:, :r] and As[:, :r], views that are returned.
    """
    B, r_plus_1, m = us.shape
    r = r_plus_1 - 1
    A_rows = As.reshape(B, r_plus_1, -1)  # (B, r+1, n*k): each term flattened to a row, a view
    # 2. Factor each side (§3a): terms^T = Q R, Q = Y^T diag(1/s), R = diag(s) E^T; terms <- Y.
    E_u, s_u = _gram_rotate(us)  # (B, r+1, r+1), (B, r+1), float64
    E_A, s_A = _gram_rotate(A_rows)
    # 3. sum_k u_k (x) A_k = Q_u C Q_A^T with the small core C = R_u R_A^T; C = U diag(sigma) V^T.
    C = (s_u[:, :, None] * E_u.transpose(0, 2, 1)) @ (E_A * s_A[:, None, :])  # (B, r+1, r+1)
    U, sigma, Vt = np.linalg.svd(C)  # sigma (B, r+1), descending
    # sigma_i <= (r+1) eps sigma_1 is the SVD's rounding noise (a rank-deficient sum: the steps
    # after a reset, a short side): zero it, so Opt gives it no factors. Kept, such terms shrink
    # under H step after step into subnormal floats, which made every product ~3x slower.
    sigma[sigma <= r_plus_1 * np.finfo(np.float64).eps * sigma[:, :1]] = 0.0
    inv_s_u, inv_s_A = _inverse_norms(s_u), _inverse_norms(s_A)  # Q = Y^T diag(1/s) on each side
    _fix_svd_signs(us, inv_s_u, U, Vt)  # one sign per pair (U_i, V_i), whatever LAPACK chose
    # 4. Opt: X X^T replaces diag(sigma), unbiased, rank r, with the least variance (§3.4).
    X = _opt_factors(sigma, signs.astype(sigma.dtype))  # (B, r+1, r)
    # 5. Map back: u'_j = Q_u U x_j = Y_u^T (diag(1/s_u) U x_j), A'_j = Q_A V x_j likewise, into
    # the first r rows of Y by the rotation's kernel, with float64 coefficients (Q never formed).
    # Since x_j serves both sides, ||u'_j|| = ||A'_j|| = ||x_j|| already (Q orthonormal): the
    # optional rescale of §3.5 is built in.
    _transform_rows(us, inv_s_u[:, :, None] * (U @ X))  # us[:, :r] <- u'_j
    _transform_rows(A_rows, inv_s_A[:, :, None] * (Vt.transpose(0, 2, 1) @ X))  # As[:, :r] <- A'_j
    return us[:, :r], As[:, :r]


def _inverse_norms(s):
    """1 / s, the scale of Q's columns in Q = Y^T diag(1/s) (§3a), and 0 where s is 0 (an exact
    zero row of Y, or one that underflowed below the smallest normal float): a zero column of Q."""
    return np.divide(1.0, s, out=np.zeros_like(s), where=s > np.finfo(np.float64).tiny)


def _fix_svd_signs(Y_u, inv_s_u, U, Vt):
    """The sign convention of §3.3, in place: flip each pair (U[:, :, i], Vt[:, i, :]) so that
    the largest-magnitude entry of Q_u U_i, the u-side singular vector of the whole sum, is
    positive (the lowest index on exact ties; a zero vector is left as it is).

    Y_u (B, k, m) from _gram_rotate, inv_s_u (B, k) its _inverse_norms; U, Vt (B, k, k) from the
    SVD of C. Singular vectors come with arbitrary signs; a flipped pair gives the same signs
    another realisation (the same distribution). For a simple sigma_i, Q_u U_i is unique up to
    sign whatever factorisation made Q_u; U_i alone is not. The u side is read: it is short (m,
    against 2n^2). Q_u U_i = 0 only where sigma_i = 0, a direction Opt gives no weight to.
    """
    coef = np.ascontiguousarray((inv_s_u[:, :, None] * U).transpose(0, 2, 1))  # U^T diag(1/s)
    QU_t = coef @ Y_u.astype(np.float64)  # (B, k, m): row i is Q_u U_i = Y_u^T diag(1/s) U_i
    top = np.abs(QU_t).argmax(axis=2)  # (B, k): first index of the largest magnitude
    lead = np.take_along_axis(QU_t, top[:, :, None], axis=2)[:, :, 0]  # (B, k)
    flip = np.where(lead < 0.0, -1.0, 1.0)
    U *= flip[:, None, :]
    Vt *= flip[:, :, None]


def _gram_rotate(terms):
    """Steps 1-4 of §3a, terms[b]^T = Q R, in place (step 2 of the OK step, module docstring).

    terms (B, k, d), float32 or float64, is overwritten by Y. Returns E (B, k, k) and s (B, k),
    float64: Q = Y^T diag(1/s) (orthonormal columns, zero where s = 0) and R = diag(s) E^T. s is
    measured on Y, not taken as sqrt(lambda): the Gram's rounding (eps lambda_max) swamps every
    direction below sqrt(eps) of the largest; Y resolves it to eps. Nor can the Gram tell such a
    direction from a null one, so a side shorter than its terms (d < k, §3.2), which has k - d
    null directions, is factored by Householder QR.
    """
    B, k, d = terms.shape
    gram = _gram(terms)  # 1. (B, k, k), accumulated in float64
    if not np.isfinite(gram).all():  # overflow in H A (a diverging run) or NaN in the terms
        raise FloatingPointError("the OK state is not finite (NaN or inf): the run diverged; "
                                 "lower the learning rate or train in float64")
    if d < k:  # tiny, its Gram used for the check only: Q (d, d), R (d, k), zero-padded
        Q, R = np.linalg.qr(terms.astype(np.float64).transpose(0, 2, 1))
        terms[:, :d], terms[:, d:] = Q.transpose(0, 2, 1), 0.0  # Y = [Q^T; 0]
        E = np.concatenate([R, np.zeros((B, k - d, k))], axis=1).transpose(0, 2, 1)  # [R; 0]^T
        return E, np.repeat([np.arange(k) < d], B, axis=0).astype(np.float64)  # s = [1; 0]
    _, E = np.linalg.eigh(gram)  # 2. lambda (ascending) is not used: see step 4
    return E, np.sqrt(_transform_rows(terms, E))  # 3-4. terms <- Y, and s = ||Y_i||


# --- 3a. The Gram-and-rotate factorisation: Numba kernels -----------------------------------------
# The terms are long (d = 2 n^2 on the A side) and few (k = r + 1), a shape that BLAS serves
# poorly, so these kernels walk each stream's terms in column blocks of _BLOCK columns, copied into
# a small buffer that stays in cache while it is used k times over. The Gram's buffer is float64,
# so every product and sum is (§3a step 1 needs it); the rotation and map-back run in the terms'
# dtype (float32 in training: twice the vector width, and the rounding is the data's own), with
# the squared norms summed in float64. fastmath: only "reassoc" (lets LLVM split a sum into vector
# lanes) and "contract" (fused multiply-add); without "nnan"/"ninf", NaN and inf still propagate
# as IEEE says. nogil: _by_streams (§6) runs them on groups of streams in its threads.
_BLOCK = 512
_FASTMATH = {"reassoc", "contract"}


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _gram(terms):
    """§3a step 1: gram[b] = terms[b] terms[b]^T, accumulated in float64.

    terms (B, k, d) -> (B, k, k). Blocks of 4 x 4 dot products share their loads (_dot_4x4).
    """
    B, k, d = terms.shape
    k4 = (k + 3) // 4 * 4  # rows padded to a multiple of 4 with zeros
    gram = np.empty((B, k, k))
    for b in range(B):
        acc = np.zeros((k4, k4))
        rows = np.zeros((k4, _BLOCK))
        for c0 in range(0, d, _BLOCK):
            width = _load_block(terms[b], c0, rows)
            for i in range(0, k4, 4):
                for j in range(i, k4, 4):
                    _dot_4x4(rows, i, j, width, acc)
        for i in range(k):
            for j in range(i, k):
                gram[b, i, j] = acc[i, j]
                gram[b, j, i] = acc[i, j]
    return gram


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _transform_rows(terms, M):
    """terms[b, :p] <- M[b]^T terms[b], in place; returns the new rows' squared norms (B, p).

    terms (B, k, d), M (B, k, p) float64 with p <= k. §3a steps 3-4 with M = E (p = k): the rotation
    Y = E^T terms and ||Y_i||^2; §3.5 with M the map-back coefficients (p = r). Each column block of
    the terms is copied before it is overwritten, and its new rows are built 4 at a time from 4
    terms per sweep, in the terms' dtype; the squares are summed in float64 from the rows as stored.
    """
    B, k, d = terms.shape
    p = M.shape[2]
    k4, p4 = (k + 3) // 4 * 4, (p + 3) // 4 * 4
    sq_norms = np.empty((B, p))
    for b in range(B):
        M4 = np.zeros((k4, p4), terms.dtype)  # zero padding: padded terms contribute nothing
        M4[:k, :p] = M[b]
        acc = np.zeros(p4)
        rows = np.zeros((k4, _BLOCK), terms.dtype)
        y = np.empty((4, _BLOCK), terms.dtype)
        for c0 in range(0, d, _BLOCK):
            width = _load_block(terms[b], c0, rows)
            for i in range(0, p4, 4):
                y[:, :width] = 0.0
                for l in range(0, k4, 4):
                    _combine_4x4(rows, M4, l, i, width, y)
                for t in range(min(4, p - i)):
                    dst = terms[b, i + t, c0:c0 + width]
                    total = 0.0
                    for c in range(width):
                        dst[c] = y[t, c]  # rounded to the terms' dtype ...
                        stored = np.float64(dst[c])  # ... and its square summed in float64
                        total += stored * stored
                    acc[i + t] += total
        sq_norms[b] = acc[:p]
    return sq_norms


@njit(cache=True, fastmath=_FASTMATH)
def _load_block(terms, c0, rows):
    """rows[:k, :width] = terms[:, c0:c0 + width], in rows' dtype; returns width (<= _BLOCK)."""
    k, d = terms.shape
    width = min(_BLOCK, d - c0)
    for i in range(k):
        src, dst = terms[i, c0:c0 + width], rows[i]  # 1-d views: the copy loop vectorises
        for c in range(width):
            dst[c] = src[c]
    return width


@njit(cache=True, fastmath=_FASTMATH)
def _dot_4x4(rows, i, j, width, acc):
    """acc[i:i+4, j:j+4] += rows[i:i+4, :width] @ rows[j:j+4, :width].T.

    Written out as 16 scalar sums on purpose: LLVM turns each into a vector register, and each
    loaded value serves 4 products (measured 5x faster than one dot product at a time).
    """
    x0, x1, x2, x3 = rows[i], rows[i + 1], rows[i + 2], rows[i + 3]
    y0, y1, y2, y3 = rows[j], rows[j + 1], rows[j + 2], rows[j + 3]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = 0.0
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = 0.0
    for c in range(width):
        p0, p1, p2, p3 = x0[c], x1[c], x2[c], x3[c]
        q0, q1, q2, q3 = y0[c], y1[c], y2[c], y3[c]
        a00 += p0 * q0; a01 += p0 * q1; a02 += p0 * q2; a03 += p0 * q3  # noqa: E702
        a10 += p1 * q0; a11 += p1 * q1; a12 += p1 * q2; a13 += p1 * q3  # noqa: E702
        a20 += p2 * q0; a21 += p2 * q1; a22 += p2 * q2; a23 += p2 * q3  # noqa: E702
        a30 += p3 * q0; a31 += p3 * q1; a32 += p3 * q2; a33 += p3 * q3  # noqa: E702
    acc[i, j] += a00; acc[i, j + 1] += a01; acc[i, j + 2] += a02; acc[i, j + 3] += a03  # noqa: E702
    acc[i + 1, j] += a10; acc[i + 1, j + 1] += a11  # noqa: E702
    acc[i + 1, j + 2] += a12; acc[i + 1, j + 3] += a13  # noqa: E702
    acc[i + 2, j] += a20; acc[i + 2, j + 1] += a21  # noqa: E702
    acc[i + 2, j + 2] += a22; acc[i + 2, j + 3] += a23  # noqa: E702
    acc[i + 3, j] += a30; acc[i + 3, j + 1] += a31  # noqa: E702
    acc[i + 3, j + 2] += a32; acc[i + 3, j + 3] += a33  # noqa: E702


@njit(cache=True, fastmath=_FASTMATH)
def _combine_4x4(rows, M, l, i, width, y):
    """y[t, :width] += sum_{s<4} M[l+s, i+t] rows[l+s, :width] for t < 4: 4 rows of M^T terms
    from 4 terms. Written out so that each loaded value of the terms serves 4 rows of y."""
    x0, x1, x2, x3 = rows[l], rows[l + 1], rows[l + 2], rows[l + 3]
    y0, y1, y2, y3 = y[0], y[1], y[2], y[3]
    m00, m01, m02, m03 = M[l, i], M[l, i + 1], M[l, i + 2], M[l, i + 3]
    m10, m11, m12, m13 = M[l + 1, i], M[l + 1, i + 1], M[l + 1, i + 2], M[l + 1, i + 3]
    m20, m21, m22, m23 = M[l + 2, i], M[l + 2, i + 1], M[l + 2, i + 2], M[l + 2, i + 3]
    m30, m31, m32, m33 = M[l + 3, i], M[l + 3, i + 1], M[l + 3, i + 2], M[l + 3, i + 3]
    for c in range(width):
        p0, p1, p2, p3 = x0[c], x1[c], x2[c], x3[c]
        y0[c] += m00 * p0 + m10 * p1 + m20 * p2 + m30 * p3
        y1[c] += m01 * p0 + m11 * p1 + m21 * p2 + m31 * p3
        y2[c] += m02 * p0 + m12 * p1 + m22 * p2 + m32 * p3
        y3[c] += m03 * p0 + m13 * p1 + m23 * p2 + m33 * p3


def ok_reduce(us, As, signs):
    """One OK reduction of one stream (§3, steps 2-5): r+1 Kronecker terms -> r terms.

    us (r+1, m), As (r+1, n, k), signs (r+1,) of +-1 -> us_new (r, m), As_new (r, n, k) with
    E[sum_j us_new[j] (x) As_new[j]] = sum_k us[k] (x) As[k] and variance min_variance(sigma, r).
    Mixed coordinate i (descending sigma) takes signs[i]; signs of kept coordinates are unused.
    """
    us, As = np.asarray(us), np.asarray(As)
    if us.ndim != 2 or us.shape[0] < 2:
        raise ValueError(f"us must have shape (r+1, m) with r >= 1, got {us.shape}")
    if As.ndim != 3 or As.shape[0] != us.shape[0]:
        raise ValueError(f"As must have shape ({us.shape[0]}, n, k) to match us, got {As.shape}")
    signs = _check_signs(signs, (us.shape[0],))
    _check_finite("us", us)
    _check_finite("As", As)
    dtype = np.result_type(us.dtype, As.dtype, np.float32)
    us_new, As_new = _ok_reduce_batch(us[None].astype(dtype), As[None].astype(dtype), signs[None])
    return us_new[0], As_new[0]


# --- 4. Opt: the optimal unbiased rank-r replacement of diag(sigma) (step 4 of §3) ----------------


@njit(cache=True)
def _opt_split(sigma, r):
    """p, the number of singular values Opt keeps exactly, and S, the sum of the others.

    p is the smallest index in 0..r-1 with (r - p) sigma[p] <= sum(sigma[p:]) (§3.4, 0-based);
    p = r - 1 always qualifies, so the search stops there even if rounding says otherwise.
    """
    for p in range(r - 1):
        S = sigma[p:].sum()
        if (r - p) * sigma[p] <= S:
            return p, S
    return r - 1, sigma[r - 1:].sum()


@njit(cache=True)
def _opt_factors(sigma, signs):
    """Opt (§3.4): X with E[X X^T] = diag(sigma) and the least variance, V_min.

    sigma (B, r+1) descending, signs (B, r+1) of +-1 -> X (B, r+1, r). Column j of X is x_j = y_j.
    Kept: x_i = sqrt(sigma_i) e_i for i < p. Mixed: with c = S / q, q = r - p, and the unit
    vector v_i = signs_i sqrt(1 - sigma_i / c) over the q+1 mixed coordinates, the q columns
    sqrt(c) w_j span the complement of v, so sum_j x_j x_j^T = c (I - v v^T), whose mean over the
    signs is diag(sigma). The construction is symmetric in both sides; the paper's released code
    scales the two sides differently and stays above V_min.
    """
    B, k = sigma.shape
    r = k - 1
    X = np.zeros((B, k, r), dtype=sigma.dtype)
    for b in range(B):
        p, S = _opt_split(sigma[b], r)
        for i in range(p):
            X[b, i, i] = np.sqrt(sigma[b, i])
        if S <= 0.0:
            continue  # nothing left to mix: the mixed block is zero
        q = r - p
        c = S / q
        v = np.empty(q + 1, dtype=sigma.dtype)
        for i in range(q + 1):
            d = max(1.0 - sigma[b, p + i] / c, 0.0)  # >= 0 in exact arithmetic; clip rounding
            v[i] = signs[b, p + i] * np.sqrt(d)
        v /= np.sqrt((v * v).sum())  # sum(d) = 1 exactly in theory; renormalise the rounding away
        # Householder reflection P = I - 2 w w^T / (w^T w) with w = v + sign(v_0) e_0 maps v to a
        # multiple of e_0, so P's columns 1..q are an orthonormal basis of v's complement. The
        # sign choice avoids cancellation, and w^T w = 2 (1 + |v_0|) >= 2: no division by zero.
        w = v.copy()
        w[0] += 1.0 if v[0] >= 0.0 else -1.0
        scale = 2.0 / (w * w).sum()
        root_c = np.sqrt(c)
        for j in range(q):
            for i in range(q + 1):
                P_ij = (1.0 if i == j + 1 else 0.0) - scale * w[i] * w[j + 1]
                X[b, p + i, p + j] = root_c * P_ij
    return X


def min_variance(sigma, r):
    """V_min(sigma, r) = S^2 / (r - p) - sum_{i >= p} sigma_i^2 (§3.4, the paper's optimality theorem).

    The least E||C' - diag(sigma)||_F^2 over random rank-<=r matrices C' with mean diag(sigma);
    sigma (r+1,) non-negative and descending. For r = 1 it is 2 sigma_1 sigma_2.
    """
    _check_positive_int("r", r)
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.shape != (r + 1,):
        raise ValueError(f"sigma must have shape ({r + 1},) for r = {r}, got {sigma.shape}")
    if np.any(sigma < 0) or np.any(np.diff(sigma) > 0) or not np.all(np.isfinite(sigma)):
        raise ValueError(f"sigma must be finite, non-negative and descending, got {sigma}")
    p, S = _opt_split(sigma, r)
    return float(S * S / (r - p) - (sigma[p:] ** 2).sum())


# --- 5. The baselines: KF-RTRL, r-KF-RTRL-AVG, UORO; TBPTT is bptt() per window -------------------


def _kf_update(state, a, H, D, signs):
    """KF-RTRL for r independent rank-1 estimates (§5): u' = c0 rho0 u + c1 rho1 a_t,
    A' = c0 H A / rho0 + c1 D_t / rho1. signs (B, r, 2) = (c0, c1). kf: r = 1; kf-avg averages r.
    """
    HA = _products(H[:, None], state.As)  # (B, r, n, 2n)
    B, r = state.us.shape[:2]
    return KronState(*_kf_mix(state.us, HA, np.broadcast_to(a[:, None], (B, r, a.shape[1])),
                              np.broadcast_to(D[:, None], HA.shape), signs))


def _kf_mix(u0, A0, u1, A1, signs):
    """The KF reduction of u0 (x) A0 + u1 (x) A1 to one unbiased term, element by element.

    u (..., m), A (..., n, k), signs (..., 2). rho_i = sqrt(||A_i|| / ||u_i||) balances the two
    sides (Mujika et al. 2018), which minimises the variance for the signs-mixing scheme.
    """
    rho0 = np.sqrt(_safe_ratio(_norm(A0, 2), _norm(u0, 1)))[..., None]  # (..., 1)
    rho1 = np.sqrt(_safe_ratio(_norm(A1, 2), _norm(u1, 1)))[..., None]
    c0, c1 = signs[..., 0:1].astype(u0.dtype), signs[..., 1:2].astype(u0.dtype)
    u_new = c0 * rho0 * u0 + c1 * rho1 * u1
    A_new = (c0 / rho0)[..., None] * A0 + (c1 / rho1)[..., None] * A1
    return u_new, A_new


def kf_reduce(us, As, signs):
    """KF-RTRL's reduction of one stream's 2 terms to 1: us (2, m), As (2, n, k), signs (2,)."""
    us, As = np.asarray(us), np.asarray(As)
    if us.ndim != 2 or us.shape[0] != 2 or As.ndim != 3 or As.shape[0] != 2:
        raise ValueError(f"kf_reduce takes us (2, m), As (2, n, k), got {us.shape}, {As.shape}")
    signs = _check_signs(signs, (2,))
    _check_finite("us", us)
    _check_finite("As", As)
    u_new, A_new = _kf_mix(us[0], As[0], us[1], As[1], signs)
    return u_new[None], A_new[None]


class UOROState(NamedTuple):
    s: np.ndarray  # (B, n)
    theta: np.ndarray  # (B, m, 2n)


def _uoro_update(state, a, H, D, nu):
    """UORO (§5): s' = rho0 H s + rho1 nu, theta' = theta / rho0 + (nu^T F_t) / rho1.

    nu (B, n) of +-1; nu^T F_t = outer(a_t, D_t^T nu) costs O(n m), never forming F_t.
    """
    s, theta = state
    nu = nu.astype(s.dtype)
    Hs = np.einsum("bij,bj->bi", H, s)  # (B, n)
    nuF = a[:, :, None] * np.einsum("bi,bij->bj", nu, D)[:, None, :]  # (B, m, 2n)
    rho0 = np.sqrt((_norm(theta, 2) + UORO_EPS) / (_norm(Hs, 1) + UORO_EPS))[:, None]  # (B, 1)
    rho1 = np.sqrt((_norm(nuF, 2) + UORO_EPS) / (_norm(nu, 1) + UORO_EPS))[:, None]
    return UOROState(rho0 * Hs + rho1 * nu, theta / rho0[..., None] + nuF / rho1[..., None])


def _norm(x, n_axes):
    """Euclidean (Frobenius) norm over the last n_axes axes."""
    return np.sqrt((x * x).sum(axis=tuple(range(-n_axes, 0))))


def _safe_ratio(num, den):
    """num / den where both are > 0, else 1: a zero side makes its Kronecker term zero, and any
    positive rescaling of a zero term is exact, so 1 is as good as any value and needs no division."""
    ok = (num > 0) & (den > 0)
    return np.divide(num, den, out=np.ones_like(num), where=ok)


# --- 6. Threads: every stream's work in one thread, BLAS held to one thread ---------------------
# Streams are independent, so each per-stream part of a learner step (H_t and D_t, the products
# H_t X, OK's reduction) runs on contiguous groups of streams, one group per thread, the caller's
# included. Inside a step BLAS is held to one thread (threadpoolctl) and the Numba kernels are
# serial: no two pools share the cores (OpenBLAS's idle threads spin ~0.1 s after each product,
# which made the OK step up to 2x slower beside parallel kernels). Each stream is computed by one
# thread in a fixed order: the results do not depend on the number of threads.

_threads = SimpleNamespace(pool=None, blas=None, count=len(os.sched_getaffinity(0))
                           if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
if hasattr(os, "register_at_fork"):  # a forked child has none of the pool's threads
    os.register_at_fork(after_in_child=lambda: setattr(_threads, "pool", None))


def set_threads(count):
    """Use count threads in every learner step (default: all cores this process may use). Runs
    side by side on one machine should share the cores out: two runs on 2 cores, 1 thread each."""
    _check_positive_int("count", count)
    if _threads.pool is not None:
        _threads.pool.shutdown()
    _threads.count, _threads.pool = int(count), None


def get_threads():
    return _threads.count


def _one_blas_thread():
    """A context in which BLAS (OpenBLAS, MKL, ...) uses one thread; restored on leaving."""
    if _threads.blas is None:
        _threads.blas = ThreadpoolController()
    return _threads.blas.limit(limits=1, user_api="blas")


def _by_streams(work, B):
    """work(s) for contiguous slices s that cover range(B), one per thread, in parallel."""
    groups = min(_threads.count, B)
    slices = [slice(B * i // groups, B * (i + 1) // groups) for i in range(groups)]
    if groups > 1 and _threads.pool is None:
        _threads.pool = ThreadPoolExecutor(_threads.count - 1, thread_name_prefix="ok_rtrl")
    futures = [_threads.pool.submit(work, s) for s in slices[1:]]
    try:
        work(slices[0])
    finally:
        wait(futures)  # no thread still writes when this returns, or raises
    for future in futures:
        future.result()  # a thread's exception, raised here


def _products(H, X):
    """H[b] @ X[b] for every stream b (H broadcast over X's middle axes), by _by_streams."""
    out = np.empty(np.broadcast_shapes(H.shape[:-2], X.shape[:-2]) + (H.shape[-2], X.shape[-1]),
                   np.result_type(H, X))
    _by_streams(lambda s: np.matmul(H[s], X[s], out=out[s]), len(out))
    return out


# --- The online learner interface (used by sequence_grad and by both runners) ------------------


def init_learner(method, params, B, rank=1):
    """Zero learner state for B streams: a NamedTuple of arrays, each with leading axis B.

    rank is OK's rank r, or kf-avg's number of averaged KF estimates; rtrl, kf and uoro ignore it.
    """
    _check_method(method, METHODS)
    _check_positive_int("rank", rank)
    _check_positive_int("B", B)
    V, n, _ = sizes(params)
    m, dtype = V + n + 1, params.W.dtype
    if method == "rtrl":
        return RTRLState(np.zeros((B, n, m, 2 * n), dtype))
    if method == "uoro":
        return UOROState(np.zeros((B, n), dtype), np.zeros((B, m, 2 * n), dtype))
    r = 1 if method == "kf" else rank
    if method == "ok":  # factors in slot 0 of a two-slot buffer with room for r+1 terms (_next_slot)
        return KronState(np.zeros((2, B, r + 1, m), dtype)[0, :, :r],
                         np.zeros((2, B, r + 1, n, 2 * n), dtype)[0, :, :r])
    return KronState(np.zeros((B, r, m), dtype), np.zeros((B, r, n, 2 * n), dtype))


def sign_shape(method, B, rank, n):
    """Shape of one step's random signs: ok (B, r+1), kf (B, 1, 2), kf-avg (B, r, 2), uoro (B, n)."""
    return {"rtrl": None, "ok": (B, rank + 1), "kf": (B, 1, 2),
            "kf-avg": (B, rank, 2), "uoro": (B, n)}[method]


def draw_signs(rng, method, B, rank, n):
    """One step's independent uniform +-1 signs for method, from the Generator rng (None for rtrl)."""
    _check_method(method, METHODS)
    shape = sign_shape(method, B, rank, n)
    return None if shape is None else (2 * rng.integers(0, 2, size=shape) - 1).astype(np.int8)


_STATE_TYPES = {"rtrl": RTRLState, "ok": KronState, "kf": KronState, "kf-avg": KronState,
                "uoro": UOROState}
_UPDATES = {"ok": _ok_update, "kf": _kf_update, "kf-avg": _kf_update, "uoro": _uoro_update}


def learner_step(params, state, h, x, y, method, signs=None, reset=None):
    """One online step: cell, learner update, gradient estimate of this step's loss (§2-5).

    h (B, n), x, y (B,) ints, signs as draw_signs gives, reset (B,) bool or None: those streams
    start a new sequence, so their h and learner state are zeroed first. Returns (losses (B,),
    dW, dW_out, h, state); dW, dW_out estimate the gradient of the batch-mean loss of this step,
    dW_out exactly, dW as sum_k outer(u_k, q A_k) (§3.6) or its analogue.

    The state is consumed: its arrays may be reused for later states (OK computes each step in
    the memory of the state two steps back, see _next_slot). To keep a state, copy it first:
    type(state)(*map(np.copy, state)).
    """
    W, W_out = params
    V, n, O = sizes(params)
    B = h.shape[0]
    _check_method(method, METHODS)
    x, y = _check_sequences(np.asarray(x)[None], np.asarray(y)[None], V, O)
    _check_finite_params(params)  # then H_t and a_t, the update's inputs, are finite too
    _check_finite("h", h)
    if reset is not None and np.any(reset):
        reset = np.asarray(reset, dtype=bool)
        h = np.where(reset[:, None], 0.0, h).astype(h.dtype)
        for field in state:  # in place: the state is consumed (see the docstring)
            field[reset] = 0.0
    if not isinstance(state, _STATE_TYPES[method]):
        raise ValueError(f"method {method!r} needs a {_STATE_TYPES[method].__name__} from "
                         f"init_learner, got a {type(state).__name__}")
    with _one_blas_thread():  # the step's own threads do its per-stream work (§6)
        h, a, f, alpha, beta = cell_step(W, x[0], h)
        H, D = jacobians(W, f, alpha, beta)
        if method == "rtrl":
            state = _rtrl_update(state, a, H, D)
        else:
            rank = state.us.shape[1] if isinstance(state, KronState) else 1
            signs = _check_signs(signs, sign_shape(method, B, rank, n))
            state = _UPDATES[method](state, a, H, D, signs)
        losses, dlogits = readout(W_out, h, y[0])
        q, dW_out = _output_grads(W_out, h, dlogits)
        return losses, _influence_grad(method, state, q), dW_out, h, state


def _influence_grad(method, state, q):
    """dL/dW = sum_i q[i] G[i] summed over streams, from the learner's (approximate) G (§2)."""
    if method == "rtrl":
        return np.einsum("bi,bilj->lj", q, state.G)
    if method == "uoro":  # G ~ s (x) theta: q G = (q . s) theta
        return np.einsum("b,blj->lj", (q * state.s).sum(axis=1), state.theta)
    us, As = state
    B, r, m = us.shape
    qA = _products(q[:, None, None, :], As)[:, :, 0]  # (B, r, 2n): q A_k, one product per term
    dW = us.reshape(B * r, m).T @ qA.reshape(B * r, -1)  # sum_b sum_k outer(u_k, q A_k): (m, 2n)
    return dW / r if method == "kf-avg" else dW  # kf-avg: the mean of r estimates


def evaluate(params, xs, ys, h0=None):
    """Forward pass only: per-symbol losses (T, B) in nats and the final state h_T (B, n)."""
    W, W_out = params
    V, n, O = sizes(params)
    xs, ys = _check_sequences(xs, ys, V, O)
    T, B = xs.shape
    h = np.zeros((B, n), W.dtype) if h0 is None else _check_state("h0", h0, (B, n), W.dtype)
    _check_finite_params(params)
    _check_finite("h0", h)
    losses = np.empty((T, B), dtype=np.float64)
    for t in range(T):
        h = cell_step(W, xs[t], h)[0]
        losses[t] = readout(W_out, h, ys[t])[0]
    return losses, h


# --- Whole-sequence gradients ------------------------------------------------------------------


def sequence_grad(params, xs, ys, method, rank=1, rng=None, *, signs=None):
    """Loss and gradient of one batch of sequences, parameters held fixed, h_0 = 0.

    xs, ys (T, B) ints. loss = sum_t of the batch-mean cross-entropy (nats). For "bptt" and
    "rtrl", (dW, dW_out) is its exact gradient; for "ok", "kf", "kf-avg", "uoro" it is the sum of
    the step-t online estimates. The random signs come from rng, or from signs (T, *sign_shape)
    when given, which lets tests enumerate every sign sequence.
    """
    _check_method(method, ("bptt",) + METHODS)
    _check_finite_params(params)
    if method == "bptt":
        losses, dW, dW_out, _ = bptt(params, xs, ys)
        return losses.sum(), dW, dW_out
    _check_positive_int("rank", rank)
    V, n, O = sizes(params)
    xs, ys = _check_sequences(xs, ys, V, O)
    T, B = xs.shape
    if method != "rtrl" and signs is None and rng is None:
        raise ValueError(f"method {method!r} is stochastic: pass rng (a numpy Generator) or signs")
    if signs is not None and method != "rtrl":
        signs = _check_signs(signs, (T,) + sign_shape(method, B, rank, n))
    state = init_learner(method, params, B, rank)
    h = np.zeros((B, n), params.W.dtype)
    loss, dW, dW_out = 0.0, np.zeros_like(params.W), np.zeros_like(params.W_out)
    for t in range(T):
        step_signs = signs[t] if signs is not None else draw_signs(rng, method, B, rank, n)
        losses, dW_t, dW_out_t, h, state = learner_step(params, state, h, xs[t], ys[t], method,
                                                        step_signs)
        loss += losses.mean()
        dW += dW_t
        dW_out += dW_out_t
    return loss, dW, dW_out


# --- Training: W-gradient clipping, Adam, and one update of each kind -----------------------------


class AdamState(NamedTuple):
    m: Params  # first-moment estimates
    v: Params  # second-moment estimates
    t: int  # steps taken


def adam_init(params):
    return AdamState(Params(*map(np.zeros_like, params)), Params(*map(np.zeros_like, params)), 0)


def apply_gradients(params, adam, dW, dW_out, lr, max_norm, beta1=0.9, beta2=0.999, eps=1e-8):
    """Clip dW to norm max_norm (W_out unclipped, as the paper's code) and take one Adam step,
    with eps one number or a pair (for W, for W_out). Returns (params, adam, norm of dW before
    clipping); the inputs are left untouched. A gradient that is not finite raises
    FloatingPointError rather than reaching the weights."""
    for name, g in (("dW", dW), ("dW_out", dW_out)):
        if not np.all(np.isfinite(g)):
            raise FloatingPointError(f"{name} is not finite (NaN or inf): the run diverged; "
                                     "lower the learning rate or train in float64")
    norm = float(np.sqrt((dW.astype(np.float64) ** 2).sum()))
    if norm > max_norm:
        dW = dW * (max_norm / norm)  # norm > max_norm > 0 here, so the division is safe
    t = adam.t + 1
    new_params, new_m, new_v = [], [], []
    for p, g, m, v, e in zip(params, (dW, dW_out), adam.m, adam.v, np.broadcast_to(eps, 2)):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        step = (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + e)  # Kingma and Ba
        new_params.append((p - lr * step).astype(p.dtype))
        new_m.append(m)
        new_v.append(v)
    return Params(*new_params), AdamState(Params(*new_m), Params(*new_v), t), norm


def online_update(params, adam, state, h, x, y, method, signs, lr, max_norm, reset=None, eps=1e-8):
    """One fully online training step, as in the paper's experiments: learner_step, then Adam.

    Returns (losses (B,), params, adam, h, state). The runners clip at max_norm = B.
    """
    losses, dW, dW_out, h, state = learner_step(params, state, h, x, y, method, signs, reset)
    params, adam, _ = apply_gradients(params, adam, dW, dW_out, lr, max_norm, eps=eps)
    return losses, params, adam, h, state


def tbptt_update(params, adam, h, xs, ys, resets, lr, max_norm, eps=1e-8):
    """One TBPTT-K update (§5): BPTT over a window xs, ys (K, B) from the carried h.

    The window's gradient is divided by K: one update sees the mean over time and batch, the
    scale of one online step, so the clipping threshold means the same for every method (Adam
    itself is nearly scale-free). Returns (losses (K,), params, adam, h_K).
    """
    losses, dW, dW_out, h = bptt(params, xs, ys, h0=h, resets=resets)
    K = len(losses)
    params, adam, _ = apply_gradients(params, adam, dW / K, dW_out / K, lr, max_norm, eps=eps)
    return losses, params, adam, h


def bits(nats):
    """Nats to bits."""
    return nats / np.log(2.0)


# --- Argument checks (public functions check; the code above them trusts its inputs) -----------


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_method(method, allowed):
    if method not in allowed:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(allowed)}")


def _check_sequences(xs, ys, V, O):
    """xs, ys (T, B) integer symbols in range(V) and range(O)."""
    xs, ys = np.asarray(xs), np.asarray(ys)
    if xs.ndim != 2 or xs.shape != ys.shape or xs.size == 0:
        raise ValueError(f"xs and ys must be non-empty (T, B) arrays of one shape, "
                         f"got {xs.shape} and {ys.shape}")
    for name, s, size in (("xs", xs, V), ("ys", ys, O)):
        if not np.issubdtype(s.dtype, np.integer):
            raise ValueError(f"{name} must hold integer symbols, got dtype {s.dtype}")
        if s.min() < 0 or s.max() >= size:
            raise ValueError(f"{name} holds symbols in [{s.min()}, {s.max()}], expected 0..{size - 1}")
    return xs, ys


def _check_signs(signs, shape):
    if signs is None:
        raise ValueError(f"signs are required: expected an array of +-1 with shape {shape}")
    signs = np.asarray(signs)
    if signs.shape != tuple(shape):
        raise ValueError(f"signs must have shape {tuple(shape)}, got {signs.shape}")
    if not np.all(np.abs(signs) == 1):
        raise ValueError("signs must all be +1 or -1")
    return signs


def _check_finite(name, array):
    """The one rule for NaN and inf: a public function refuses them in any array argument."""
    if not np.isfinite(array).all():
        bad = np.size(array) - np.count_nonzero(np.isfinite(array))
        raise ValueError(f"{name} holds {bad} NaN or inf value(s) among {np.size(array)}: "
                         "expected finite numbers")


def _check_finite_params(params):
    """W and W_out finite. In learner_step this is the per-step check: each entry of H_t is at
    most max|W| (|alpha| + |beta| < 1) plus f, so H_t and a_t = [x_t, h_{t-1}, 1] are finite
    whenever W and h are, and W (m x 2n) is cheaper to check than H (B x n x n)."""
    _check_finite("params.W", params.W)
    _check_finite("params.W_out", params.W_out)


def _check_state(name, array, shape, dtype):
    array = np.asarray(array)
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    return array.astype(dtype)
