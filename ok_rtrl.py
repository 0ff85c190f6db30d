"""Optimal Kronecker-Sum Approximation of Real Time Recurrent Learning (OK), in numpy and Numba.

F. Benzing, M. M. Gauy, A. Mujika, A. Martinsson, A. Steger. "Optimal Kronecker-Sum Approximation
of Real Time Recurrent Learning". ICML 2019, arXiv:1902.03993. "§n" names a section of this
module and "§4.k" step k of OK (class OK); docs/math.md derives what the code relies on, and
docs/porting.md states it for ports.

For every RNN whose weights W enter as z_t = a_t W, Real Time Recurrent Learning carries the
influence G_t = dh_t/dW forward in time, G_t = H_t G_{t-1} + a_t (x) D_t, given the cell's H_t
and D_t (§2): exact online gradients, at the price of N m P numbers per stream. OK stores G as
a sum of r Kronecker products u_k (x) A_k. Each step adds one, and OK replaces the r+1 terms by
r drawn at random, unbiased and with the least variance any such replacement can have (the
paper's theorem). KF-RTRL and UORO are unbiased replacements with more variance; exact RTRL and
BPTT are the references. The paper's network is a recurrent highway cell (§1).

Notation (B streams lead every batched array; the highway cell has N = n, P = 2n):

    paper          code          shape                      meaning
    x_t, y_t       x, y          (B,), (B,) ints            input and target symbols (V and O of them)
    h_t, z_t       h, z          (B, N), (B, P)             state, pre-activation
    a_t            a             (B, m)                     what W multiplies: [onehot(x_t), h_{t-1}, 1]
    W, W_out       W, W_out      (m, P), (N + 1, O)         cell and read-out weights (last row: bias)
    H_t, D_t       H, D          (B, N, N), (B, N, P)       dh_t/dh_{t-1}, dh_t/dz_t
    q_t            q             (B, N)                     dL_t/dh_t (of the batch-mean loss)
    G_t            G             (B, N, m, P)               influence dh_t/dW (exact RTRL)
    u_k, A_k       us, As        (B, r, m), (B, r, N, P)    Kronecker factors: G[i,l,j] ~ sum_k u_k[l] A_k[i,j]
    Q, R           Q_u, R_u ...  (m, k), (k, k) ...         terms^T = Q R on each side (OK's step 2), k = r+1
    C, sigma       C, sigma      (k, k), (k,)               C = R_u R_A^T and its singular values, descending
    U, V           U, Vt         (k, k) each                C's singular vectors, Vt = V^T
    p, X           p, X          int, (k, r)                how many sigma Opt keeps; Opt's factors x_j
    V_min          min_variance  scalar                     least variance of any unbiased rank-r reduction
    s, theta       s, theta      (B, N), (B, m, P)          UORO's factors: G ~ s (x) theta

The module has three parts. Part I is the algorithm, the spec, in the paper's order and plain
numpy: §1 the highway cell, §2 exact RTRL for any cell and BPTT, §3 Algorithm 1 (an unbiased
Kronecker-sum step), §4 Algorithm 2 (OK), §5 Algorithm 3 (Opt), §6 the baselines, §7 the
learner, §8 Adam. Part II, the engine (§9), computes the same numbers faster: Numba kernels,
threads, OK's factorisation by matrix products and its reused memory. Every estimator, the
learner, bptt and evaluate run the engine unless given spec=True; the tests run both and
compare them. Part III checks the public functions' arguments.
"""
import os
from concurrent.futures import ThreadPoolExecutor, wait
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
from numba import njit
from numba.extending import register_jitable
from threadpoolctl import ThreadpoolController

__all__ = [
    "METHODS", "UORO_EPS", "INIT_STD", "SVD_NOISE",
    "Params", "init_params", "sizes", "cell_step", "jacobians", "readout", "readout_grads",
    "evaluate", "Influence", "random_signs", "RTRLState", "RTRL", "bptt", "KronState",
    "KFState", "KroneckerSum", "OK", "ok_reduce", "opt", "min_variance", "KF", "kf_reduce",
    "UOROState", "UORO", "LearnerState", "Learner", "sequence_grad", "AdamState", "adam_init",
    "apply_gradients", "bits", "set_threads", "get_threads"]

METHODS = ("rtrl", "ok", "kf", "kf-avg", "uoro")  # the Learner's methods; "bptt" is offline
UORO_EPS = 1e-7  # UORO's epsilon in its rescaling factors (Tallec and Ollivier 2017)
INIT_STD = 0.01  # weight initialisation N(0, 0.01^2), as the paper's code
SVD_NOISE = np.finfo(np.float64).eps  # OK's step 3 zeroes sigma_i <= k SVD_NOISE sigma_1


# ================================================================================================
# Part I. The algorithm, in the paper's order: plain numpy, the spec
# ================================================================================================


# --- 1. The recurrent highway cell ----------------------------------------------------------------


class Params(NamedTuple):
    """W (m, 2n): rows [input, hidden, bias], columns [candidate, carry gate]. W_out (n + 1, O)."""

    W: np.ndarray
    W_out: np.ndarray


def init_params(n_in, n_hidden, n_out, rng, dtype=np.float32):
    """Every weight, biases included, from N(0, INIT_STD^2) as the paper's code does; rng is a
    numpy Generator or a seed."""
    for name, size in (("n_in", n_in), ("n_hidden", n_hidden), ("n_out", n_out)):
        _check_positive_int(name, size)
    rng, dtype = _check_rng(rng), _check_float_dtype(dtype)
    W = rng.normal(0.0, INIT_STD, size=(n_in + n_hidden + 1, 2 * n_hidden))
    W_out = rng.normal(0.0, INIT_STD, size=(n_hidden + 1, n_out))
    return Params(W.astype(dtype), W_out.astype(dtype))


def sizes(params):
    """(V, n, O): input symbols, hidden units, output symbols."""
    n = params.W.shape[1] // 2
    return params.W.shape[0] - n - 1, n, params.W_out.shape[1]


def cell_step(W, x, h_prev):
    """One step of the cell: a_t = [onehot(x_t), h_{t-1}, 1], z_t = a_t W = [z_c, z_f],
    c = 2 sigmoid(z_c) - 1, f = sigmoid(z_f), h_t = f h_{t-1} + (1 - f) c.

    W (m, 2n), x (B,) ints, h_prev (B, n) -> h (B, n), a (B, m), and f, alpha = dh/dz_c =
    (1 - f) c', beta = dh/dz_f = (h_{t-1} - c) f', each (B, n).
    """
    W, x, h_prev = _check_cell(W, x, h_prev)
    n = h_prev.shape[1]
    a = _cell_input(W, x, h_prev)  # (B, m)
    z = a @ W  # (B, 2n)
    c, f = 2 * _sigmoid(z[:, :n]) - 1, _sigmoid(z[:, n:])  # c = tanh(z_c / 2)
    h = f * h_prev + (1 - f) * c
    alpha = (1 - f) * (1 - c) * (1 + c) / 2  # c' = (1 - c^2) / 2
    beta = (h_prev - c) * f * (1 - f)  # f' = f (1 - f)
    return h, a, f, alpha, beta


def _cell_input(W, x, h_prev):
    """a_t = [onehot(x_t), h_{t-1}, 1] (B, m), in W's dtype."""
    B, n = h_prev.shape
    V = W.shape[0] - n - 1
    a = np.zeros((B, V + n + 1), dtype=W.dtype)
    a[np.arange(B), x] = 1.0
    a[:, V:V + n] = h_prev
    a[:, -1] = 1.0
    return a


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))  # exp overflows to inf for z << 0, and the result to 0: no NaN


def jacobians(W, f, alpha, beta):
    """H_t = dh_t/dh_{t-1} = diag(f) + diag(alpha) W_hc^T + diag(beta) W_hf^T (B, n, n) and
    D_t = dh_t/dz_t = [diag(alpha), diag(beta)] (B, n, 2n), where W_hc = W[V:V+n, :n] and
    W_hf = W[V:V+n, n:] are the rows of W that h_{t-1} meets."""
    W, f, alpha, beta = _check_gates(W, f, alpha, beta)
    n = f.shape[1]
    V = W.shape[0] - n - 1
    W_hc, W_hf = W[V:V + n, :n], W[V:V + n, n:]  # (n, n) each
    eye = np.eye(n, dtype=W.dtype)
    H = f[:, :, None] * eye + alpha[:, :, None] * W_hc.T + beta[:, :, None] * W_hf.T  # (B, n, n)
    D = np.concatenate([alpha[:, :, None] * eye, beta[:, :, None] * eye], axis=2)  # (B, n, 2n)
    return H, D


def readout(W_out, h, y):
    """Softmax read-out y_t = softmax([h_t, 1] W_out) and its cross-entropy.

    W_out (N + 1, O), h (B, N), y (B,) ints -> losses (B,) in nats, and dlogits (B, O) =
    softmax - onehot(y), the gradient of each stream's own loss with respect to its logits.
    """
    return _readout(*_check_readout(W_out, h, y))


def _readout(W_out, h, y):  # readout, unchecked: the learner and bptt have checked its inputs
    B = h.shape[0]
    logits = h @ W_out[:-1] + W_out[-1]  # (B, O)
    logits = logits - logits.max(axis=1, keepdims=True)  # log-sum-exp shift: exp stays <= 1
    log_norm = np.log(np.exp(logits).sum(axis=1))  # (B,)
    losses = log_norm - logits[np.arange(B), y]
    dlogits = np.exp(logits - log_norm[:, None])
    dlogits[np.arange(B), y] -= 1.0
    return losses, dlogits


def readout_grads(W_out, h, dlogits):
    """Gradients of the batch-mean loss from readout's dlogits: q = dL/dh (B, N), which an
    influence turns into dL/dW (Influence.grad), and the exact dL/dW_out (N + 1, O)."""
    return _readout_grads(*_check_readout(W_out, h, dlogits=dlogits))


def _readout_grads(W_out, h, dlogits):  # readout_grads, unchecked, as _readout
    B = h.shape[0]
    dlogits = dlogits / B
    q = dlogits @ W_out[:-1].T  # (B, N)
    dW_out = np.vstack([h.T @ dlogits, dlogits.sum(axis=0)])  # [h, 1]^T dlogits
    return q, dW_out


def evaluate(params, xs, ys, h0=None, *, spec=False):
    """Forward pass only: per-symbol losses (T, B) in nats and the final state h_T (B, n)."""
    W, W_out = params = _check_params(params)
    V, n, O = sizes(params)
    xs, ys = _check_sequences(xs, ys, V, O)
    T, B = xs.shape
    h = np.zeros((B, n), W.dtype) if h0 is None else _check_h0(h0, B, n, W.dtype)
    step = cell_step if spec else _fast_cell_step
    losses = np.empty((T, B), dtype=np.float64)
    with _one_blas_thread():  # small products, one after the other (§9d)
        for t in range(T):
            h = step(W, xs[t], h)[0]
            losses[t] = _readout(W_out, h, ys[t])[0]
    return losses, h


# --- 2. Exact RTRL, for any cell, and BPTT --------------------------------------------------------


class Influence:
    """The influence G_t = dh_t/dW of B streams, or an unbiased estimate of it, carried online.

    For any RNN whose weights W (m, P) enter as z_t = a_t W, with a state of N numbers:
    update(a, H, D) takes G_{t-1} to G_t = H_t G_{t-1} + a_t (x) D_t, given the cell's a_t (B, m),
    H_t (B, N, N) and D_t (B, N, P); grad(q) turns q_t = dL_t/dh_t (B, N) into dL_t/dW (m, P)
    summed over the streams; reset(streams) zeroes G for streams that start a new sequence.
    An estimator owns its arrays: state() returns a copy, load(state) copies one in, so nothing
    it hands out changes later. Randomised ones draw each step's signs (sign_shape) from rng (a
    numpy Generator, used as it is, or a seed) unless update is given them. spec=True computes
    with Part I's plain numpy instead of the engine (§9): the same numbers up to rounding.
    Subclasses: RTRL, OK, KF (KF-RTRL, r-KF-RTRL-AVG), UORO.
    """

    sign_shape = None  # shape of one step's +-1 signs; None: deterministic

    def __init__(self, B, m, N, P, *, rng=None, dtype=np.float64, spec=False):
        for name, size in (("B", B), ("m", m), ("N", N), ("P", P)):
            _check_positive_int(name, size)
        self.B, self.m, self.N, self.P = B, m, N, P
        self.dtype, self.spec = _check_float_dtype(dtype), _check_bool("spec", spec)
        self.rng = None if rng is None else _check_rng(rng)
        self._matmul = np.matmul if spec else _products  # H[b] @ X[b] for every stream b

    def update(self, a, H, D, signs=None):
        """One step: G_t = H_t G_{t-1} + a_t (x) D_t, exact or an unbiased estimate of it."""
        B, m, N, P = self.B, self.m, self.N, self.P
        a, H, D = (_check_finite(name, _check_array(name, array, shape, self.dtype, what))
                   for name, array, shape, what in (("a", a, (B, m), "(B, m)"),
                                                    ("H", H, (B, N, N), "(B, N, N)"),
                                                    ("D", D, (B, N, P), "(B, N, P)")))
        signs = self._draw_signs(signs)
        with _one_blas_thread():  # the step's own threads do its per-stream work (§9d)
            self._update(a, H, D, signs)

    def grad(self, q):
        """dL_t/dW (m, P) = sum over streams b and units i of q[b, i] G_t[b, i]."""
        q = _check_finite("q", _check_array("q", q, (self.B, self.N), self.dtype, "(B, N)"))
        with _one_blas_thread():
            return self._grad(q)

    def reset(self, streams):
        """Zero the influence of the streams where streams (B,) is True: new sequences."""
        streams = _check_mask("streams", streams, self.B)
        for array in self._state:
            array[streams] = 0.0

    def state(self):
        """A copy of the estimator's arrays: an RTRLState, KronState, KFState or UOROState."""
        return type(self._state)(*map(np.copy, self._state))

    def load(self, state):
        """Copy state in: a NamedTuple of state()'s type, shapes and dtype."""
        kind = type(self._state)
        if not isinstance(state, kind):
            raise TypeError(f"{type(self).__name__}.load takes a {kind.__name__}, got "
                            f"{_describe(state)}")
        checked = [_check_finite(name, _check_array(name, new, old.shape, self.dtype))
                   for name, new, old in zip(kind._fields, state, self._state)]
        for new, old in zip(checked, self._state):  # only once every field is checked
            old[...] = new

    def _draw_signs(self, signs):
        """This step's signs: those given, checked, else drawn from rng; None if deterministic."""
        if self.sign_shape is None:
            if signs is not None:
                raise ValueError(f"{type(self).__name__} is deterministic: it takes no signs")
            return None
        if signs is not None:
            return _check_signs(signs, self.sign_shape)
        if self.rng is None:
            raise ValueError(f"{type(self).__name__} draws random signs: give it rng= (a numpy "
                             "Generator or a seed), or pass signs= to each step")
        return random_signs(self.rng, self.sign_shape)


def random_signs(rng, shape):
    """Independent uniform +-1 signs of the given shape (int8), from rng (a Generator or a seed)."""
    return (2 * _check_rng(rng).integers(0, 2, size=shape) - 1).astype(np.int8)


class RTRLState(NamedTuple):
    G: np.ndarray  # (B, N, m, P) influence dh_t/dW


class RTRL(Influence):
    """Exact RTRL: G_t = H_t G_{t-1} + F_t, F_t[i, l, j] = a_t[l] D_t[i, j], in full. N m P
    numbers per stream and O(N^2 m P) work per step: the reference for every approximation.
    rng is accepted, as by every estimator, and unused."""

    def __init__(self, B, m, N, P, *, rng=None, dtype=np.float64, spec=False):
        super().__init__(B, m, N, P, rng=rng, dtype=dtype, spec=spec)
        self._state = RTRLState(np.zeros((B, N, m, P), self.dtype))

    def _update(self, a, H, D, signs):
        G = self._state.G
        B, N, m, P = G.shape
        HG = self._matmul(H, G.reshape(B, N, m * P)).reshape(G.shape)  # (B, N, m, P)
        self._state = RTRLState(HG + np.einsum("bl,bij->bilj", a, D))

    def _grad(self, q):
        return np.einsum("bi,bilj->lj", q, self._state.G)


def bptt(params, xs, ys, h0=None, resets=None, *, spec=False):
    """Exact backpropagation through time over xs, ys (T, B), from h0 (B, n) or zeros.

    resets (T, B) bool, optional: stream b starts afresh (h = 0) at step t, so no gradient flows
    into earlier steps. Returns (losses, dW, dW_out, h_T): losses (T,) the batch-mean cross-entropy
    of each step, (dW, dW_out) the gradient of their sum. Called once per window with h0 = the last
    window's h_T, this is TBPTT-k (§6).
    """
    W, W_out = params = _check_params(params)
    V, n, O = sizes(params)
    xs, ys = _check_sequences(xs, ys, V, O)
    T, B = xs.shape
    h = np.zeros((B, n), W.dtype) if h0 is None else _check_h0(h0, B, n, W.dtype)
    if resets is not None:
        resets = _check_mask("resets", resets, T, B)
    step = cell_step if spec else _fast_cell_step
    with _one_blas_thread():  # small products, one after the other (§9d)
        step_losses, dW_out = np.empty(T), np.zeros_like(W_out)
        tape, qs = [], np.empty((T, B, n), W.dtype)
        for t in range(T):  # forward, keeping what the backward pass needs
            if resets is not None:
                h = np.where(resets[t][:, None], 0.0, h).astype(W.dtype)
            h, a, f, alpha, beta = step(W, xs[t], h)
            losses, dlogits = _readout(W_out, h, ys[t])
            qs[t], dW_out_t = _readout_grads(W_out, h, dlogits)
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


# --- 3. Algorithm 1: one step of an unbiased Kronecker-sum approximation of RTRL ------------------
# G_{t-1} is held as r Kronecker terms, G_{t-1} ~ sum_k u_k (x) A_k, meaning G[i, l, j] =
# sum_k u_k[l] A_k[i, j]. Then the recursion of §2 needs no G:
#   1. The r+1 terms (u_1, H_t A_1), ..., (u_r, H_t A_r), (a_t, D_t); their sum is exactly
#      H_t G_{t-1} + a_t (x) D_t.
#   2. A reduction replaces them by r terms (u'_j, A'_j), random, with their sum as expectation.
#   3. The gradient: dL_t/dW = sum_j outer(u'_j, q_t A'_j), summed over the streams.
# With the weights fixed, H_t, D_t and a_t do not depend on the draws, so if each reduction is
# unbiased given the past, G'_t is unbiased for G_t (by induction, the recursion being linear),
# and so is the gradient, which is linear in G_t. OK (§4) is the reduction of least variance;
# KF-RTRL (§6) reduces two terms to one.


class KronState(NamedTuple):
    """OK's influence: G ~ sum_k u_k (x) A_k."""
    us: np.ndarray  # (B, r, m)
    As: np.ndarray  # (B, r, N, P)


class KFState(NamedTuple):
    """KF's: r independent rank-1 estimates u_k (x) A_k, whose mean estimates G."""
    us: np.ndarray  # (B, r, m)
    As: np.ndarray  # (B, r, N, P)


class KroneckerSum(Influence):
    """An influence held as Kronecker terms us (B, r, m), As (B, r, N, P) (Algorithm 1); OK and
    KF are its reductions."""

    def _grad(self, q):
        """Algorithm 1, step 3: sum_b sum_k outer(u_k, q A_k)."""
        us, As = self._state
        B, r, m = us.shape
        qA = self._matmul(q[:, None, None, :], As)[:, :, 0]  # (B, r, P): q A_k for every term
        return us.reshape(B * r, m).T @ qA.reshape(B * r, -1)  # (m, P)


# --- 4. Algorithm 2: OK, the optimal Kronecker-sum reduction --------------------------------------


class OK(KroneckerSum):
    """OK of rank r (Algorithm 2): Algorithm 1 with the unbiased reduction of least variance.

    Per stream and step: 1. the r+1 terms (Algorithm 1); 2.-5. ok_reduce: each side factored,
    the core C and its SVD, Opt (§5), the map back; 6. the gradient (Algorithm 1, step 3).
    signs (B, r+1): Opt's random signs, one per singular value. The engine (§9b) computes the
    same steps in place, by thread groups, with another factorisation in step 2.
    """

    def __init__(self, B, m, N, P, rank, *, rng=None, dtype=np.float64, spec=False):
        _check_positive_int("rank", rank)
        super().__init__(B, m, N, P, rng=rng, dtype=dtype, spec=spec)
        self.r, self.sign_shape = rank, (B, rank + 1)
        self._engine = None if spec else _OKEngine(B, rank, m, N, P, self.dtype)
        self._state = (KronState(np.zeros((B, rank, m), self.dtype),
                                 np.zeros((B, rank, N, P), self.dtype)) if spec
                       else KronState(*self._engine.factors()))

    def _update(self, a, H, D, signs):
        if not self.spec:
            self._state = KronState(*self._engine.update(a, H, D, signs))
            return
        us, As = self._state
        # 1. The r+1 terms: (u_k, H_t A_k) for k <= r, and (a_t, D_t).
        terms_u = np.concatenate([us, a[:, None]], axis=1)  # (B, r+1, m)
        terms_A = np.concatenate([H[:, None] @ As, D[:, None]], axis=1)  # (B, r+1, N, P)
        # 2.-5. Each stream's r+1 terms reduced to r.
        new = [ok_reduce(terms_u[b], terms_A[b], signs[b]) for b in range(self.B)]
        self._state = KronState(np.stack([u for u, _ in new]), np.stack([A for _, A in new]))


def ok_reduce(us, As, signs):
    """OK's reduction of one stream's r+1 Kronecker terms to r (steps 2-5 of Algorithm 2).

    us (k, m), As (k, N, P) with k = r+1, signs (k,) of +-1 -> us_new (r, m), As_new (r, N, P),
    with E[sum_j us_new[j] (x) As_new[j]] = sum_k us[k] (x) As[k] and variance min_variance.
    Computed in float64, returned in the terms' dtype. Mixed coordinate i (descending sigma)
    takes signs[i]; the signs of kept coordinates are unused.
    """
    us, As, signs = _check_terms(us, As, signs)
    (k, m), (N, P) = us.shape, As.shape[1:]
    dtype = np.result_type(us.dtype, As.dtype, np.float32)
    # 2. Orthonormal bases of both sides, by Householder QR: us^T = Q_u R_u, [vec A_k]^T = Q_A R_A.
    Q_u, R_u = _householder_qr(us.T)  # (m, k), (k, k)
    Q_A, R_A = _householder_qr(As.reshape(k, N * P).T)  # (N P, k), (k, k); vec row-major
    # 3. The core: sum_k us[k] (x) As[k] = Q_u C Q_A^T with C = R_u R_A^T, and its SVD.
    U, sigma, Vt = np.linalg.svd(R_u @ R_A.T)  # sigma descending
    # sigma_i <= k eps sigma_1 is the SVD's rounding noise (a rank-deficient sum: the steps after
    # a reset, a short side): zero it, so Opt gives it no factors. Kept, such terms would shrink
    # under H step after step into subnormal floats, on which every product is slow.
    sigma[sigma <= k * SVD_NOISE * sigma[0]] = 0.0
    QU, QV = Q_u @ U, Q_A @ Vt.T  # (m, k), (N P, k): the singular vectors of the whole sum
    flip = _sign_convention(QU)  # (k,): one sign per pair (QU_i, QV_i)
    QU, QV = QU * flip, QV * flip
    # 4. Opt (Algorithm 3): X X^T replaces diag(sigma), unbiased, rank r, least variance.
    X = opt(sigma, signs)  # (k, r)
    # 5. Map back: u'_j = Q_u U x_j, A'_j = Q_A V x_j. The same x_j on both sides gives
    # ||u'_j|| = ||A'_j||: the paper's optional rescale comes for free.
    return (QU @ X).T.astype(dtype), (QV @ X).T.reshape(k - 1, N, P).astype(dtype)


def _sign_convention(QU):
    """The sign convention of OK's step 3: flips (k,) that make the largest-magnitude entry of each
    column QU_i (the first, on exact ties) positive; a zero column (padding) keeps its sign.

    A pair (QU_i, QV_i) and its negation are the same singular pair, and the two give the same
    signs two realisations of one distribution: the convention makes the realisation independent
    of the library's choice (and of how Q was made: QU_i, unlike U_i, does not depend on it).
    """
    top = np.abs(QU).argmax(axis=-2)  # (..., k); QU may be a stack (..., m, k), as in §9b
    return np.where(np.take_along_axis(QU, top[..., None, :], axis=-2)[..., 0, :] < 0, -1.0, 1.0)


def _householder_qr(M):
    """M (d, k) = Q R in float64, Q (d, k) with orthonormal or zero columns, R (k, k).

    Householder QR (LAPACK), never Gram-Schmidt, which loses orthogonality on nearly dependent
    terms. A side shorter than its terms (d < k, tiny networks) has only d directions: Q (d, d)
    is padded with zero columns and R (d, k) with zero rows, so that C stays k x k.
    """
    d, k = M.shape
    Q, R = np.linalg.qr(M.astype(np.float64))  # (d, min(d, k)), (min(d, k), k)
    return np.pad(Q, ((0, 0), (0, k - Q.shape[1]))), np.pad(R, ((0, k - R.shape[0]), (0, 0)))


# --- 5. Algorithm 3: Opt, the optimal unbiased rank-r replacement of diag(sigma) ------------------


@register_jitable  # plain Python here; the engine's kernel (§9b) compiles the same code
def opt(sigma, signs):
    """Opt: X (r+1, r) with E[X X^T] = diag(sigma) and the least variance, V_min.

    sigma (r+1,) non-negative, descending; signs (r+1,) of +-1. Column j of X is x_j = y_j: the
    construction is symmetric in both sides (the paper's released code scales the two sides
    differently and stays above V_min). Kept: x_i = sqrt(sigma_i) e_i for i < p. Mixed: the
    other n_mix + 1 = r + 1 - p values, with c = S / n_mix and the unit vector v_i = signs_i
    sqrt(1 - sigma_i / c), become n_mix columns sqrt(c) w_j spanning v's complement, so that
    sum_j x_j x_j^T = c (I - v v^T) there, whose mean over the signs is diag(sigma).
    """
    k = len(sigma)
    r = k - 1
    p, S = _opt_split(sigma, r)
    X = np.zeros((k, r))
    X[:p, :p] = np.diag(np.sqrt(sigma[:p]))  # the kept values, exactly
    if S <= 0.0:
        return X  # nothing left to mix: the mixed block is zero
    n_mix = r - p  # terms to mix the last n_mix + 1 values into (q in docs/porting.md)
    c = S / n_mix  # the mixing level
    d = np.maximum(1 - sigma[p:] / c, 0.0)  # >= 0 in exact arithmetic: clip the rounding
    v = signs[p:] * np.sqrt(d)
    v = v / np.sqrt(np.sum(v * v))  # sum(d) = 1 in exact arithmetic; renormalise the rounding
    # The Householder reflection I - 2 w w^T / (w^T w), w = v + sign(v_0) e_0 (sign(0) = +1),
    # maps v to a multiple of e_0, so its columns 1..n_mix are an orthonormal basis of v's
    # complement.
    # The sign avoids cancellation, and w^T w = 2 (1 + |v_0|) >= 2: no division by zero.
    w = v.copy()
    w[0] += 1.0 if v[0] >= 0.0 else -1.0
    reflection = np.eye(n_mix + 1) - np.outer(2 / np.sum(w * w) * w, w)  # (n_mix+1, n_mix+1)
    X[p:, p:] = np.sqrt(c) * reflection[:, 1:]
    return X


@register_jitable
def _opt_split(sigma, r):
    """p, the number of singular values Opt keeps exactly, and S, the sum of the others.

    p is the smallest index in 0..r-1 with (r - p) sigma[p] <= sum(sigma[p:]) (0-based);
    p = r - 1 always qualifies, so the search stops there even if rounding says otherwise.
    """
    for p in range(r - 1):
        S = sigma[p:].sum()
        if (r - p) * sigma[p] <= S:
            return p, S
    return r - 1, sigma[r - 1:].sum()


def min_variance(sigma, r):
    """V_min(sigma, r) = S^2 / (r - p) - sum_{i >= p} sigma_i^2 (the paper's optimality theorem).

    The least E||C' - diag(sigma)||_F^2 over random rank-<=r matrices C' with mean diag(sigma);
    sigma (r+1,) non-negative and descending. For r = 1 it is 2 sigma_1 sigma_2.
    """
    _check_positive_int("r", r)
    sigma = _check_sigma(sigma, r)
    p, S = _opt_split(sigma, r)
    return float(S * S / (r - p) - (sigma[p:] ** 2).sum())


# --- 6. The baselines: KF-RTRL, r-KF-RTRL-AVG, UORO; TBPTT is bptt() per window -------------------


class KF(KroneckerSum):
    """KF-RTRL (Mujika et al. 2018): Algorithm 1 at rank 1, whose two terms (u, H_t A) and
    (a_t, D_t) are mixed into one by two random signs. copies r > 1: r-KF-RTRL-AVG, the mean of r
    independent KF estimates (variance / r), the memory of OK at rank r. signs (B, r, 2)."""

    def __init__(self, B, m, N, P, copies=1, *, rng=None, dtype=np.float64, spec=False):
        _check_positive_int("copies", copies)
        super().__init__(B, m, N, P, rng=rng, dtype=dtype, spec=spec)
        self.copies, self.sign_shape = copies, (B, copies, 2)
        self._state = KFState(np.zeros((B, copies, m), self.dtype),
                              np.zeros((B, copies, N, P), self.dtype))

    def _update(self, a, H, D, signs):
        us, As = self._state
        HA = self._matmul(H[:, None], As)  # (B, r, N, P)
        B, r = us.shape[:2]
        self._state = KFState(*_kf_mix(us, HA, np.broadcast_to(a[:, None], (B, r, a.shape[1])),
                                       np.broadcast_to(D[:, None], HA.shape), signs))

    def _grad(self, q):
        return super()._grad(q) / self.copies  # the mean of the estimates


def _kf_mix(u0, A0, u1, A1, signs):
    """The KF reduction of u0 (x) A0 + u1 (x) A1 to one unbiased term: u' = c0 rho0 u0 +
    c1 rho1 u1, A' = c0 A0 / rho0 + c1 A1 / rho1, element by element.

    u (..., m), A (..., N, P), signs (..., 2) = (c0, c1). rho_i = sqrt(||A_i|| / ||u_i||) balances
    the two sides (Mujika et al. 2018), which minimises the variance for this mixing scheme.
    """
    rho0 = np.sqrt(_safe_ratio(_norm(A0, 2), _norm(u0, 1)))[..., None]  # (..., 1)
    rho1 = np.sqrt(_safe_ratio(_norm(A1, 2), _norm(u1, 1)))[..., None]
    c0, c1 = signs[..., 0:1].astype(u0.dtype), signs[..., 1:2].astype(u0.dtype)
    u_new = c0 * rho0 * u0 + c1 * rho1 * u1
    A_new = (c0 / rho0)[..., None] * A0 + (c1 / rho1)[..., None] * A1
    return u_new, A_new


def kf_reduce(us, As, signs):
    """KF-RTRL's reduction of one stream's 2 terms to 1: us (2, m), As (2, N, P), signs (2,)."""
    us, As, signs = _check_terms(us, As, signs, k=2)
    u_new, A_new = _kf_mix(us[0], As[0], us[1], As[1], signs)
    return u_new[None], A_new[None]


class UOROState(NamedTuple):
    s: np.ndarray  # (B, N)
    theta: np.ndarray  # (B, m, P)


class UORO(Influence):
    """UORO (Tallec and Ollivier 2017): G ~ s (x) theta, with s' = rho0 H s + rho1 nu and
    theta' = theta / rho0 + (nu^T F_t) / rho1 for random signs nu (B, N). O(N m) per step, in
    plain numpy whether spec or not: it needs no engine."""

    def __init__(self, B, m, N, P, *, rng=None, dtype=np.float64, spec=False):
        super().__init__(B, m, N, P, rng=rng, dtype=dtype, spec=spec)
        self.sign_shape = (B, N)
        self._state = UOROState(np.zeros((B, N), self.dtype), np.zeros((B, m, P), self.dtype))

    def _update(self, a, H, D, nu):
        s, theta = self._state
        nu = nu.astype(s.dtype)
        Hs = np.einsum("bij,bj->bi", H, s)  # (B, N)
        nuF = a[:, :, None] * np.einsum("bi,bij->bj", nu, D)[:, None, :]  # (B, m, P), never F_t
        rho0 = np.sqrt((_norm(theta, 2) + UORO_EPS) / (_norm(Hs, 1) + UORO_EPS))[:, None]  # (B, 1)
        rho1 = np.sqrt((_norm(nuF, 2) + UORO_EPS) / (_norm(nu, 1) + UORO_EPS))[:, None]
        self._state = UOROState(rho0 * Hs + rho1 * nu,
                                theta / rho0[..., None] + nuF / rho1[..., None])

    def _grad(self, q):
        s, theta = self._state  # q G = (q . s) theta
        return np.einsum("b,blj->lj", (q * s).sum(axis=1), theta)


def _norm(x, n_axes):
    """Euclidean (Frobenius) norm over the last n_axes axes."""
    return np.sqrt((x * x).sum(axis=tuple(range(-n_axes, 0))))


def _safe_ratio(num, den):
    """num / den where both are > 0, else 1: a zero side makes its Kronecker term zero, and any
    positive rescaling of a zero term is exact, so 1 is as good as any value and needs no division."""
    ok = (num > 0) & (den > 0)
    return np.divide(num, den, out=np.ones_like(num), where=ok)


# --- 7. The learner: the highway cell trained online with an influence estimator ------------------


class LearnerState(NamedTuple):
    h: np.ndarray  # (B, n): h_{t-1}, the state the next step starts from
    influence: tuple  # the estimator's: RTRLState, KronState, KFState or UOROState


class Learner:
    """B streams of the highway cell (§1) learning online with one of METHODS.

    params gives the sizes and dtype; method "ok" (rank r), "kf", "kf-avg" (the mean of r KF
    estimates), "uoro" or exact "rtrl"; rng (a numpy Generator, used as it is, or a seed) draws
    the signs; spec=True runs Part I's plain numpy (cell and estimator) instead of the engine.
    step carries h and the influence (self.influence) from step to step; state() and load()
    copy both out and in.
    """

    def __init__(self, params, B, method="ok", rank=1, rng=None, *, spec=False):
        W, _ = params = _check_params(params)
        _check_method(method, METHODS)
        _check_positive_int("B", B)
        _check_positive_int("rank", rank)
        V, n, _ = sizes(params)
        m, N, P, dtype = V + n + 1, n, 2 * n, W.dtype
        kwargs = dict(rng=rng, dtype=dtype, spec=spec)
        self.method, self.rank, self.spec = method, rank, spec
        if method == "rtrl":
            self.influence = RTRL(B, m, N, P, **kwargs)
        elif method == "ok":
            self.influence = OK(B, m, N, P, rank, **kwargs)
        elif method == "uoro":
            self.influence = UORO(B, m, N, P, **kwargs)
        else:
            self.influence = KF(B, m, N, P, 1 if method == "kf" else rank, **kwargs)
        self._h = np.zeros((B, n), dtype)

    def step(self, params, x, y, reset=None, signs=None):
        """One online step: the cell, the influence's update (§2-6), the read-out.

        params: the weights now (the learner's sizes and dtype); x, y (B,) input and target
        symbols; reset (B,) bool: those streams start a new sequence (h = 0, G = 0) first;
        signs: this step's (influence.sign_shape), else drawn from rng. Returns losses (B,) in
        nats and the gradient of this step's batch-mean loss, dW (m, 2n) from the influence and
        dW_out (n + 1, O) exactly. A refused call changes nothing.
        """
        h = self._h
        (B, n), influence = h.shape, self.influence
        W, W_out = params = _check_params(params, like=(influence.m, n, h.dtype))
        V, _, O = sizes(params)
        x, y = _check_symbols("x", x, (B,), V), _check_symbols("y", y, (B,), O)
        reset = None if reset is None else _check_mask("reset", reset, B)
        signs = influence._draw_signs(signs)
        if reset is not None and reset.any():
            h = np.where(reset[:, None], 0.0, h).astype(h.dtype)
            influence.reset(reset)
        step, jacobians_of = (cell_step, jacobians) if self.spec else (_fast_cell_step,
                                                                       _fast_jacobians)
        with _one_blas_thread():  # the step's own threads do its per-stream work (§9d)
            h, a, f, alpha, beta = step(W, x, h)
            H, D = jacobians_of(W, f, alpha, beta)
            influence._update(a, H, D, signs)  # a, H, D are finite: see _check_params
            losses, dlogits = _readout(W_out, h, y)
            q, dW_out = _readout_grads(W_out, h, dlogits)
            dW = influence._grad(q)
        self._h = h
        return losses, dW, dW_out

    def state(self):
        """A copy of h and of the influence's arrays, as a LearnerState."""
        return LearnerState(self._h.copy(), self.influence.state())

    def load(self, state):
        """Copy a LearnerState in (as state() gives one, for this learner's sizes and method)."""
        if not isinstance(state, LearnerState):
            raise TypeError(f"Learner.load takes a LearnerState, got {_describe(state)}")
        h = _check_finite("h", _check_array("h", state.h, self._h.shape, self._h.dtype, "(B, n)"))
        self.influence.load(state.influence)
        self._h = h.copy()


def sequence_grad(params, xs, ys, method, rank=1, rng=None, *, signs=None, spec=False):
    """Loss and gradient of one batch of sequences, parameters held fixed, h_0 = 0.

    xs, ys (T, B) ints. loss = sum_t of the batch-mean cross-entropy (nats). For "bptt" and
    "rtrl", (dW, dW_out) is its exact gradient; for "ok", "kf", "kf-avg", "uoro" it is the sum of
    the step-t online estimates. The random signs come from rng, or from signs (T, *sign_shape)
    when given, which lets tests enumerate every sign sequence.
    """
    _check_method(method, ("bptt",) + METHODS)
    W, W_out = params = _check_params(params)
    if method == "bptt":
        losses, dW, dW_out, _ = bptt(params, xs, ys, spec=spec)
        return losses.sum(), dW, dW_out
    V, n, O = sizes(params)
    xs, ys = _check_sequences(xs, ys, V, O)
    T, B = xs.shape
    learner = Learner(params, B, method, rank, rng, spec=spec)
    shape = learner.influence.sign_shape
    if shape is not None and signs is None and rng is None:
        raise ValueError(f"method {method!r} is stochastic: pass rng (a numpy Generator) or signs")
    if shape is not None and signs is not None:
        signs = _check_signs(signs, (T,) + shape)
    loss, dW, dW_out = 0.0, np.zeros_like(W), np.zeros_like(W_out)
    for t in range(T):
        losses, dW_t, dW_out_t = learner.step(params, xs[t], ys[t],
                                              signs=None if signs is None else signs[t])
        loss += losses.mean()
        dW += dW_t
        dW_out += dW_out_t
    return loss, dW, dW_out


# --- 8. Training: W-gradient clipping and Adam ----------------------------------------------------


class AdamState(NamedTuple):
    m: Params  # first-moment estimates
    v: Params  # second-moment estimates
    t: int  # steps taken


def adam_init(params):
    """Adam's state for params: zero moments, no step taken."""
    params = _check_weights(params)
    return AdamState(Params(*map(np.zeros_like, params)), Params(*map(np.zeros_like, params)), 0)


def apply_gradients(params, adam, dW, dW_out, lr, max_norm, beta1=0.9, beta2=0.999, eps=1e-8):
    """Clip dW to norm max_norm (W_out unclipped, as the paper's code) and take one Adam step,
    with eps one number or a pair (for W, for W_out). Returns (params, adam, norm of dW before
    clipping); the inputs are left untouched. A gradient that is not finite raises
    FloatingPointError rather than reaching the weights. params may be any pair of weights
    (W, W_out), of any cell."""
    params, adam, dW, dW_out = _check_adam_step(params, adam, dW, dW_out, lr, max_norm, beta1,
                                                beta2, eps)
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


def bits(nats):
    """Nats to bits."""
    return nats / np.log(2.0)


# ================================================================================================
# Part II. The engine: the same numbers, fast (docs/speed.md measures each piece)
# ================================================================================================
# What the learners, bptt and evaluate run unless spec=True. Each function names the Part I
# function it computes and says what it does differently; the tests compare the two.


# --- 9a. The cell: its elementwise work in Numba kernels, without numpy's temporaries -------------


def _fast_cell_step(W, x, h_prev):
    """cell_step (§1) without its checks, the gates in one kernel pass (_highway_gates)."""
    a = _cell_input(W, x, h_prev)  # (B, m)
    z = a @ W  # (B, 2n)
    h, f, alpha, beta = _highway_gates(z, np.ascontiguousarray(h_prev))
    return h, a, f, alpha, beta


def _fast_jacobians(W, f, alpha, beta):
    """jacobians (§1) without its checks: each entry of H and D written once, by _fill_jacobians,
    on the streams' thread groups (§9d)."""
    (B, n), V = f.shape, W.shape[0] - f.shape[1] - 1
    W_hc_T, W_hf_T = (np.ascontiguousarray(W[V:V + n, j:j + n].T) for j in (0, n))
    H, D = np.empty((B, n, n), W.dtype), np.zeros((B, n, 2 * n), W.dtype)
    _by_streams(lambda g: _fill_jacobians(W_hc_T, W_hf_T, f[g], alpha[g], beta[g], H[g], D[g]), B)
    return H, D


@njit(cache=True)
def _highway_gates(z, h_prev):
    """cell_step's elementwise part (§1): z (B, 2n), h_prev (B, n) -> h, f, alpha, beta (B, n),
    in one pass without numpy's temporaries, with the sigmoid of z_c (sig) kept, so that
    c' = 2 sig (1 - sig); its float literals make the scalar arithmetic float64, where the spec
    rounds in the data's dtype."""
    B, n = h_prev.shape
    h = np.empty_like(h_prev)
    f = np.empty_like(h_prev)
    alpha = np.empty_like(h_prev)
    beta = np.empty_like(h_prev)
    for b in range(B):
        for i in range(n):
            sig = 1.0 / (1.0 + np.exp(-z[b, i]))  # exp overflows to inf, sig to 0: no NaN
            c = 2.0 * sig - 1.0
            g = 1.0 / (1.0 + np.exp(-z[b, n + i]))
            h[b, i] = g * h_prev[b, i] + (1.0 - g) * c
            f[b, i] = g
            alpha[b, i] = (1.0 - g) * 2.0 * sig * (1.0 - sig)
            beta[b, i] = (h_prev[b, i] - c) * g * (1.0 - g)
    return h, f, alpha, beta


@njit(cache=True, nogil=True)
def _fill_jacobians(W_hc_T, W_hf_T, f, alpha, beta, H, D):
    """H = alpha[:, :, None] * W_hc_T + beta[:, :, None] * W_hf_T + f[:, :, None] * eye(n) and
    D[:, i, i], D[:, i, n + i] = alpha[:, i], beta[:, i] (D zero elsewhere, as given), each
    entry written once, without numpy's temporaries of H's size (docs/speed.md)."""
    B, n = f.shape
    for b in range(B):
        for i in range(n):
            a, c = alpha[b, i], beta[b, i]
            for j in range(n):
                H[b, i, j] = a * W_hc_T[i, j] + c * W_hf_T[i, j]
            H[b, i, i] += f[b, i]
            D[b, i, i] = a
            D[b, i, n + i] = c


# --- 9b. OK's step in place: Gram-and-rotate instead of QR, two reused slots, thread groups -------


class _OKEngine:
    """OK's steps 1-5 (class OK, ok_reduce) for B streams, in place in reused memory.

    Two slots of r+1 terms per side, (2, B, r+1, *shape) each: the factors are the first r terms
    of the current slot; a step writes its r+1 terms into the free slot, reduces them there and
    the slots swap. Fresh arrays of the terms' size (tens of MB) would cost a page fault per 4 kB
    on first write, at the paper's sizes nearly as much as the products H A themselves
    (docs/speed.md). Each thread group of streams (§9d) runs the whole step for its streams.
    """

    def __init__(self, B, r, m, N, P, dtype):
        self._slots = [np.zeros((2, B, r + 1) + shape, dtype) for shape in ((m,), (N, P))]
        self._current, self._r, self._B = 0, r, B

    def factors(self):
        """The current factors us (B, r, m), As (B, r, N, P): views of the current slot."""
        return [slot[self._current, :, :self._r] for slot in self._slots]

    def update(self, a, H, D, signs):
        """One step of OK from the current factors; returns the new ones (views)."""
        us, As = self.factors()  # (B, r, m), (B, r, N, P): the current slot
        terms_u, terms_A = (slot[1 - self._current] for slot in self._slots)  # (B, r+1, ...)
        r = self._r

        def group_step(g):  # the streams of the slice g, in one thread
            # 1. The r+1 terms, H_t A_k computed straight into the free slot: the floor's work.
            terms_u[g, :r], terms_u[g, r] = us[g], a[g]
            np.matmul(H[g, None], As[g], out=terms_A[g, :r])
            terms_A[g, r] = D[g]
            _ok_reduce_in_place(terms_u[g], terms_A[g], signs[g])  # 2-5

        _by_streams(group_step, self._B)
        self._current = 1 - self._current
        return self.factors()


def _ok_reduce_in_place(terms_u, terms_A, signs):
    """ok_reduce (§4) for B streams at once, in place, with step 2 by _factor instead of QR.

    terms_u (B, r+1, m), terms_A (B, r+1, N, P), signs (B, r+1) of +-1. Both arrays are
    overwritten: by Y (step 2), then by the new factors, which are returned as views of their
    first r terms: us (B, r, m), As (B, r, N, P). Q is never formed: the map back combines the
    rows of Y, in the terms' dtype (float32 in training), with float64 coefficients.
    """
    B, k, m = terms_u.shape
    r = k - 1
    # 2. Factor each side: terms^T = Q R, Q = Y^T diag(1/s), R = diag(s) E^T; Y overwrites terms.
    Y_u, E_u, s_u = _factor(terms_u)  # (B, k, m), (B, k, k), (B, k)
    Y_A, E_A, s_A = _factor(_flat_terms(terms_A))  # (B, k, N*P): each A_k as a row
    # 3. The core: sum_k u_k (x) A_k = Q_u C Q_A^T with C = R_u R_A^T, and its SVD.
    C = (s_u[:, :, None] * E_u.transpose(0, 2, 1)) @ (E_A * s_A[:, None, :])  # (B, k, k)
    U, sigma, Vt = np.linalg.svd(C)  # sigma (B, k), descending
    sigma[sigma <= k * SVD_NOISE * sigma[:, :1]] = 0.0  # rounding noise, as in ok_reduce
    inv_s_u, inv_s_A = _inverse_norms(s_u), _inverse_norms(s_A)  # Q = Y^T diag(1/s)
    _fix_svd_signs(Y_u, inv_s_u, U, Vt)  # ok_reduce's sign convention
    # 4. Opt (Algorithm 3): X X^T replaces diag(sigma), unbiased, rank r, least variance.
    X = _opt_factors(sigma, signs.astype(sigma.dtype))  # (B, k, r)
    # 5. Map back: u'_j = Q_u U x_j = Y_u^T (diag(1/s_u) U x_j), into the first r rows of Y_u;
    # A'_j = Q_A V x_j likewise (docs/math.md: why on Y, not on the terms). The same x_j on both
    # sides gives ||u'_j|| = ||A'_j||: the paper's optional rescale comes for free.
    _combine_rows(Y_u, inv_s_u[:, :, None] * (U @ X))
    _combine_rows(Y_A, inv_s_A[:, :, None] * (Vt.transpose(0, 2, 1) @ X))
    return terms_u[:, :r], terms_A[:, :r]


def _factor(terms):
    """Step 2 of OK on one side, as _householder_qr, in place: terms[b]^T = Q R, Q orthonormal.

    terms (B, k, d) is overwritten by Y and returned, with E (B, k, k) and s (B, k), float64:
    Q = Y^T diag(1/s) (a zero column where s = 0) and R = diag(s) E^T; Q is never formed.
    The Gram-and-rotate factorisation (docs/math.md): Gram = terms terms^T = E diag(lambda) E^T
    in float64, Y = E^T terms (orthogonal rows), s_i = ||Y_i||. Q R = terms^T for any s, since E
    is orthogonal, so OK stays unbiased whatever the rounding. s is measured on Y, not taken as
    sqrt(lambda): the Gram's rounding (eps lambda_max) swamps every direction below sqrt(eps) of
    the largest, which Y resolves to eps. Nor can the Gram tell such a direction from a null one,
    so a side shorter than its terms (d < k, tiny networks), with k - d null directions, is
    factored by Householder QR: Q padded with zero columns, R with zero rows.
    """
    B, k, d = terms.shape
    gram = _gram(terms)  # (B, k, k), accumulated in float64
    if not np.isfinite(gram).all():  # overflow in H A (a diverging run) or NaN in the terms
        raise FloatingPointError("the OK state is not finite (NaN or inf): the run diverged; "
                                 "lower the learning rate or train in float64")
    if d < k:  # tiny: its Gram served the check above only. Q (d, d), R (d, k), zero-padded
        Q, R = np.linalg.qr(terms.astype(np.float64).transpose(0, 2, 1))
        terms[:, :d], terms[:, d:] = Q.transpose(0, 2, 1), 0.0  # Y = [Q^T; 0]
        E = np.concatenate([R, np.zeros((B, k - d, k))], axis=1).transpose(0, 2, 1)  # [R; 0]^T
        return terms, E, np.repeat([np.arange(k) < d], B, axis=0).astype(np.float64)  # s = [1; 0]
    _, E = np.linalg.eigh(gram)  # lambda (ascending) is not used: s comes from Y
    return terms, E, np.sqrt(_combine_rows(terms, E))  # terms <- Y = E^T terms; s = ||Y_i||


def _flat_terms(terms_A):
    """terms_A (B, k, N, P) as rows (B, k, N*P): a view, checked, so writing rows writes terms."""
    rows = terms_A.reshape(terms_A.shape[0], terms_A.shape[1], -1)
    if not np.shares_memory(rows, terms_A):
        raise ValueError("OK's A terms must be contiguous in their last two axes")
    return rows


def _inverse_norms(s):
    """1 / s, the scale of Q's columns in Q = Y^T diag(1/s), and 0 where s is 0 (an exact zero
    row of Y, or one that underflowed below the smallest normal float): a zero column of Q."""
    return np.divide(1.0, s, out=np.zeros_like(s), where=s > np.finfo(np.float64).tiny)


def _fix_svd_signs(Y_u, inv_s_u, U, Vt):
    """ok_reduce's sign convention (step 3), in place: flip each pair (U[:, :, i], Vt[:, i, :])
    so that the largest-magnitude entry of Q_u U_i is positive, with Q_u = Y_u^T diag(1/s_u) from
    step 2: Y_u (B, k, m), inv_s_u (B, k), U and Vt (B, k, k) (docs/math.md, "The sign
    convention")."""
    coef = np.ascontiguousarray((inv_s_u[:, :, None] * U).transpose(0, 2, 1))  # U^T diag(1/s)
    QU_t = coef @ Y_u.astype(np.float64)  # (B, k, m): row i is Q_u U_i = Y_u^T diag(1/s) U_i
    flip = _sign_convention(QU_t.transpose(0, 2, 1))  # (B, k)
    U *= flip[:, None, :]
    Vt *= flip[:, :, None]


@njit(cache=True)
def _opt_factors(sigma, signs):
    """opt (§5) for every stream, compiled: sigma (B, r+1), signs (B, r+1) -> X (B, r+1, r)."""
    B, k = sigma.shape
    X = np.empty((B, k, k - 1))
    for b in range(B):
        X[b] = opt(sigma[b], signs[b])
    return X


# --- 9c. The long side's kernels: Gram matrices and combinations of rows --------------------------
# The OK terms are long (d = N P on the A side) and few (k = r + 1), a shape BLAS serves poorly,
# so _gram and _combine_rows walk each stream's terms in column blocks of _BLOCK columns, copied
# into a small buffer that stays in cache while it is used k times over, and compute 4 x 4 output
# entries per sweep. The Gram's buffer is float64, so every product and sum is; _combine_rows
# runs in the terms' dtype (float32 in training: twice the vector width, and the rounding is the
# data's own), with squared norms summed in float64. fastmath: only "reassoc" (lets LLVM split a
# sum into vector lanes) and "contract" (fused multiply-add); without "nnan"/"ninf", NaN and inf
# still propagate as IEEE says. nogil: _by_streams (§9d) runs them in its threads.
_BLOCK = 512
_FASTMATH = {"reassoc", "contract"}


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _gram(terms):
    """terms (B, k, d) -> gram (B, k, k) = np.einsum("bkd,bld->bkl", terms, terms) in float64,
    each product and sum in float64 whatever the terms' dtype."""
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
def _combine_rows(terms, M):
    """In place, terms[:, :n_out] = np.einsum("bko,bkd->bod", M, terms), in the terms' dtype, and
    returns the new rows' squared norms (B, n_out), summed in float64 from the rows as stored.

    terms (B, k, d), M (B, k, n_out) float64 with n_out <= k. Each column block of the terms is copied
    before it is overwritten, and its new rows are built 4 at a time from 4 terms per sweep.
    """
    B, k, d = terms.shape
    n_out = M.shape[2]
    k4, out4 = (k + 3) // 4 * 4, (n_out + 3) // 4 * 4
    sq_norms = np.empty((B, n_out))
    for b in range(B):
        M4 = np.zeros((k4, out4), terms.dtype)  # zero padding: padded terms contribute nothing
        M4[:k, :n_out] = M[b]
        acc = np.zeros(out4)
        rows = np.zeros((k4, _BLOCK), terms.dtype)
        y = np.empty((4, _BLOCK), terms.dtype)
        for c0 in range(0, d, _BLOCK):
            width = _load_block(terms[b], c0, rows)
            for i in range(0, out4, 4):
                y[:, :width] = 0.0
                for l in range(0, k4, 4):
                    _combine_4x4(rows, M4, l, i, width, y)
                for t in range(min(4, n_out - i)):
                    dst = terms[b, i + t, c0:c0 + width]
                    total = 0.0
                    for c in range(width):
                        dst[c] = y[t, c]  # rounded to the terms' dtype ...
                        stored = np.float64(dst[c])  # ... and its square summed in float64
                        total += stored * stored
                    acc[i + t] += total
        sq_norms[b] = acc[:n_out]
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
    loaded value serves 4 products.
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


# --- 9d. Threads: every stream's work in one thread, BLAS held to one thread ----------------------
# Streams are independent, so each per-stream part of a step (H_t and D_t, the products H_t X,
# OK's reduction) runs on contiguous groups of streams, one group per thread, the caller's
# included. Inside a step BLAS is held to one thread (threadpoolctl) and the Numba kernels are
# serial: no two pools share the cores (OpenBLAS's idle threads spin after each product, on the
# cores the kernels need; docs/speed.md). Each stream is computed by one thread in a fixed
# order: the results do not depend on the number of threads.

_threads = SimpleNamespace(pool=None, blas=None, count=len(os.sched_getaffinity(0))
                           if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
if hasattr(os, "register_at_fork"):  # a forked child has none of the pool's threads
    os.register_at_fork(after_in_child=lambda: setattr(_threads, "pool", None))


def set_threads(count):
    """Use count threads in every step (default: all cores this process may use). Runs side by
    side on one machine should share the cores out: two runs on 2 cores, 1 thread each."""
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
    """work(g) for contiguous slices g of the streams that cover range(B), one per thread."""
    groups = min(_threads.count, B)
    slices = [slice(B * i // groups, B * (i + 1) // groups) for i in range(groups)]
    if groups > 1 and _threads.pool is None:
        _threads.pool = ThreadPoolExecutor(_threads.count - 1, thread_name_prefix="ok_rtrl")
    futures = [_threads.pool.submit(work, g) for g in slices[1:]]
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
    _by_streams(lambda g: np.matmul(H[g], X[g], out=out[g]), len(out))
    return out


# ================================================================================================
# Part III. Argument checks: public functions check, the code above them trusts its inputs
# ================================================================================================
# One rule, as numpy and scipy have it: TypeError for a wrong kind of thing (not an array, not an
# integer, a float array where symbols go, another dtype than the weights'), ValueError for a
# wrong value (a shape, a size, a symbol out of range, NaN or inf, a sign that is not +-1).
# Array arguments may be anything np.asarray takes; a list of numbers takes the dtype expected,
# a numpy array must have it already. Each message names the argument and says what was expected
# and what came, without printing an array; a refused call changes nothing.


def _describe(value):
    """What a value is, for an error message, without printing a whole array."""
    if isinstance(value, np.ndarray):
        what = f"{value.dtype} array of shape {value.shape}"
    else:
        text = repr(value)
        what = type(value).__name__ + (f" ({text})" if len(text) <= 40 else "")
    return ("an " if what[0] in "aeiou" else "a ") + what


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= 1, got {_describe(value)}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")


def _check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {_describe(value)}")
    return bool(value)


def _check_number(name, value, low, high=np.inf, low_open=True, high_open=True):
    """A real number (not a bool) in the interval from low to high, each end open or closed."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below and np.isfinite(value)):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")


def _check_rng(rng):
    """A numpy Generator, used as it is, or a seed (an integer or a SeedSequence) for a new one."""
    kinds = (np.random.Generator, np.random.SeedSequence, np.random.BitGenerator, int, np.integer)
    if isinstance(rng, bool) or not isinstance(rng, kinds):
        raise TypeError(f"rng must be a numpy Generator or an integer seed, got {_describe(rng)}")
    if isinstance(rng, (int, np.integer)) and rng < 0:
        raise ValueError(f"a seed must be >= 0, got {rng}")
    return np.random.default_rng(rng)


def _check_float_dtype(dtype):
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {_describe(dtype)}") from None
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def _check_method(method, allowed):
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, one of {', '.join(allowed)}; got "
                        f"{_describe(method)}")
    if method not in allowed:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(allowed)}")


def _as_array(name, value, dtype=None):
    """value as a numpy array: arrays as they are, other array-likes converted (to dtype)."""
    if isinstance(value, np.ndarray):
        return value
    try:
        array = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        array = None
    if array is None or array.dtype == object:
        raise TypeError(f"{name} must be an array, got {_describe(value)}")
    return array


def _check_array(name, value, shape, dtype, what=None):
    """value as an array of this shape and dtype; what names the shape's sizes."""
    value = _as_array(name, value, dtype)
    expected = f"{what} = {shape}" if what else f"{shape}"
    if value.dtype != dtype:
        raise TypeError(f"expected {name} of shape {expected} and dtype {np.dtype(dtype)}, got "
                        f"dtype {value.dtype}")
    if value.shape != shape:
        raise ValueError(f"expected {name} of shape {expected} and dtype {np.dtype(dtype)}, got "
                         f"shape {value.shape}")
    return value


def _check_finite(name, array):
    """The one rule for NaN and inf: a public function refuses them in any array argument."""
    if not np.isfinite(array).all():
        bad = np.size(array) - np.count_nonzero(np.isfinite(array))
        raise ValueError(f"{name} holds {bad} NaN or inf value(s) among {np.size(array)}: "
                         "expected finite numbers")
    return array


def _check_float_matrix(name, value, dtype=None):
    """A finite 2-d float32 or float64 array (of dtype, if given)."""
    value = _as_array(name, value, dtype)
    if value.dtype not in (np.float32, np.float64) or (dtype is not None and value.dtype != dtype):
        raise TypeError(f"{name} must hold {np.dtype(dtype) if dtype else 'float32 or float64'} "
                        f"numbers, got {_describe(value)}")
    if value.ndim != 2:
        raise ValueError(f"{name} must be 2-d, got shape {value.shape}")
    return _check_finite(name, value)


def _check_weights(params):
    """params as a pair (W, W_out) of finite 2-d float arrays of one dtype, any cell's."""
    if not (isinstance(params, tuple) and len(params) == 2):
        raise TypeError(f"params must be a Params(W, W_out), got {_describe(params)}")
    W = _check_float_matrix("params.W", params[0])
    return Params(W, _check_float_matrix("params.W_out", params[1], W.dtype))


def _check_params(params, like=None):
    """The highway cell's params: W (m, 2n), W_out (n + 1, O), finite, one float dtype;
    like=(m, n, dtype) also fixes those. Finite W and h make H_t, D_t and a_t finite: each entry
    of H_t is at most max|W| (|alpha| + |beta| < 1) plus f, and W is cheaper to check than H."""
    W, W_out = _check_weights(params)
    m, n, dtype = like if like is not None else (W.shape[0], W.shape[1] // 2, W.dtype)
    _check_array("params.W", W, (m, 2 * n), _check_float_dtype(dtype), "(m, 2n)")
    _check_array("params.W_out", W_out, (n + 1, W_out.shape[1]), dtype, "(n + 1, O)")
    if m < n + 2:
        raise ValueError(f"params.W must have m = V + n + 1 >= n + 2 rows, got {m} for n = {n}")
    return Params(W, W_out)


def _check_h0(h0, B, n, dtype):
    return _check_finite("h0", _check_array("h0", h0, (B, n), dtype, "(B, n)"))


def _check_batch(name, value, size, dtype, what):
    """value as a finite (B, size) array of dtype, B its own first dimension (what: "(B, n)")."""
    value = _as_array(name, value, dtype)
    shape = (value.shape[0] if value.ndim else 0, size)
    return _check_finite(name, _check_array(name, value, shape, dtype, what))


def _check_symbols(name, symbols, shape, size):
    """symbols: integers in range(size), of the given shape."""
    symbols = _as_array(name, symbols)
    if not np.issubdtype(symbols.dtype, np.integer):
        raise TypeError(f"expected {name} of shape {shape} holding integer symbols, got "
                        f"{_describe(symbols)}")
    if symbols.shape != shape:
        raise ValueError(f"expected {name} of shape {shape} holding integer symbols, got "
                         f"shape {symbols.shape}")
    if symbols.size and (symbols.min() < 0 or symbols.max() >= size):
        raise ValueError(f"{name} holds symbols in [{symbols.min()}, {symbols.max()}], expected "
                         f"0..{size - 1}")
    return symbols


def _check_sequences(xs, ys, V, O):
    """xs, ys (T, B) integer symbols in range(V) and range(O)."""
    xs = _as_array("xs", xs)
    if xs.ndim != 2 or xs.size == 0:
        raise ValueError(f"xs must be a non-empty (T, B) array, got {_describe(xs)}")
    return _check_symbols("xs", xs, xs.shape, V), _check_symbols("ys", ys, xs.shape, O)


def _check_cell(W, x, h_prev):
    """cell_step's: W (m, 2n), x (B,) symbols in range(V), h_prev (B, n) in W's dtype."""
    W = _check_float_matrix("W", W)
    n = W.shape[1] // 2
    if W.shape[1] % 2 or W.shape[0] < n + 2:
        raise ValueError(f"W must have shape (m, 2n) with m = V + n + 1 > n + 1, got {W.shape}")
    h_prev = _check_batch("h_prev", h_prev, n, W.dtype, "(B, n)")
    return W, _check_symbols("x", x, (len(h_prev),), W.shape[0] - n - 1), h_prev


def _check_gates(W, f, alpha, beta):
    """jacobians': W (m, 2n), f, alpha, beta (B, n) in W's dtype, finite."""
    W = _check_float_matrix("W", W)
    f = _check_batch("f", f, W.shape[1] // 2, W.dtype, "(B, n)")
    return W, f, *(_check_finite(name, _check_array(name, value, f.shape, W.dtype, "(B, n)"))
                   for name, value in (("alpha", alpha), ("beta", beta)))


def _check_readout(W_out, h, y=None, dlogits=None):
    """readout's and readout_grads': W_out (N + 1, O), h (B, N) in its dtype, y (B,) symbols in
    range(O) or dlogits (B, O), finite."""
    W_out = _check_float_matrix("W_out", W_out)
    h = _check_batch("h", h, W_out.shape[0] - 1, W_out.dtype, "(B, N)")
    if dlogits is None:
        return W_out, h, _check_symbols("y", y, (len(h),), W_out.shape[1])
    return W_out, h, _check_finite("dlogits", _check_array(
        "dlogits", dlogits, (len(h), W_out.shape[1]), W_out.dtype, "(B, O)"))


def _check_mask(name, mask, *shape):
    """mask of booleans (or 0/1) of the given shape, as a bool array."""
    mask = _as_array(name, mask)
    if not (mask.dtype == bool or np.issubdtype(mask.dtype, np.integer)):
        raise TypeError(f"expected {name} of shape {shape} holding booleans, got "
                        f"{_describe(mask)}")
    if mask.shape != shape or not (mask.dtype == bool or np.isin(mask, (0, 1)).all()):
        raise ValueError(f"expected {name} of shape {shape} holding booleans, got "
                         f"{_describe(mask)}")
    return mask.astype(bool)


def _check_terms(us, As, signs, k=None):
    """One stream's k Kronecker terms, us (k, m) and As (k, N, P), finite, with k signs (k >= 2)."""
    us, As = _as_array("us", us), _as_array("As", As)
    for name, value in (("us", us), ("As", As)):
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise TypeError(f"{name} must hold real numbers, got {_describe(value)}")
    k = us.shape[0] if k is None and us.ndim == 2 else k
    if us.ndim != 2 or As.ndim != 3 or not us.shape[0] == As.shape[0] == k or k < 2:
        raise ValueError(f"expected us (k, m) and As (k, N, P), k = {k or 'r+1 >= 2'} terms, got "
                         f"us {us.shape} and As {As.shape}")
    return _check_finite("us", us), _check_finite("As", As), _check_signs(signs, (k,))


def _check_signs(signs, shape):
    if signs is None:
        raise ValueError(f"signs are required: expected an array of +-1 with shape {shape}")
    signs = _as_array("signs", signs)
    if not (np.issubdtype(signs.dtype, np.integer) or np.issubdtype(signs.dtype, np.floating)):
        raise TypeError(f"signs must hold +1 and -1, got {_describe(signs)}")
    if signs.shape != tuple(shape):
        raise ValueError(f"signs must have shape {tuple(shape)}, got {signs.shape}")
    if not np.all(np.abs(signs) == 1):
        raise ValueError("signs must all be +1 or -1")
    return signs


def _check_sigma(sigma, r):
    """sigma (r+1,) finite, non-negative, descending, as float64."""
    sigma = _as_array("sigma", sigma, np.float64).astype(np.float64)
    if sigma.shape != (r + 1,):
        raise ValueError(f"sigma must have shape ({r + 1},) for r = {r}, got {sigma.shape}")
    if np.any(sigma < 0) or np.any(np.diff(sigma) > 0) or not np.all(np.isfinite(sigma)):
        raise ValueError(f"sigma must be finite, non-negative and descending, got {sigma}")
    return sigma


def _check_adam_step(params, adam, dW, dW_out, lr, max_norm, beta1, beta2, eps):
    """apply_gradients' arguments, as torch.optim.Adam checks its own: the weights, an AdamState
    for them, gradients of their shapes and dtype, lr > 0, max_norm > 0, 0 <= beta < 1, eps > 0
    (one number or a pair). A gradient that is not finite is a diverged run: FloatingPointError."""
    params = _check_weights(params)
    if not (isinstance(adam, AdamState) and all(isinstance(moment, tuple) and len(moment) == 2
                                                 for moment in adam[:2])):
        raise TypeError(f"adam must be an AdamState (from adam_init), got {_describe(adam)}")
    for field, moment in zip(("m", "v"), adam[:2]):
        for name, value, weight in zip(("W", "W_out"), moment, params):
            _check_array(f"adam.{field}.{name}", value, weight.shape, weight.dtype)
    if isinstance(adam.t, bool) or not isinstance(adam.t, (int, np.integer)) or adam.t < 0:
        raise TypeError(f"adam.t must be an integer >= 0, got {_describe(adam.t)}")
    grads = [_check_array(name, value, weight.shape, weight.dtype, what)
             for name, value, weight, what in (("dW", dW, params.W, "W's"),
                                               ("dW_out", dW_out, params.W_out, "W_out's"))]
    _check_number("lr", lr, 0.0)
    _check_number("max_norm", max_norm, 0.0)
    _check_number("beta1", beta1, 0.0, 1.0, low_open=False)
    _check_number("beta2", beta2, 0.0, 1.0, low_open=False)
    eps_values = list(np.ravel(_as_array("eps", eps))) if np.ndim(eps) else [eps]
    if len(eps_values) not in (1, 2):
        raise ValueError(f"eps must be one number or a pair (for W, for W_out), got "
                         f"{_describe(eps)}")
    for e in eps_values:
        _check_number("eps", e, 0.0)
    for name, g in zip(("dW", "dW_out"), grads):
        if not np.all(np.isfinite(g)):
            raise FloatingPointError(f"{name} is not finite (NaN or inf): the run diverged; "
                                     "lower the learning rate or train in float64")
    return (params, adam, *grads)
