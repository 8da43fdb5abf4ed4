"""Plain numpy loop implementations: the independent references the tests compare to."""

from __future__ import annotations

import numpy as np


def pad_nhwc(x, pads, value=0.0):
    (t, b), (l, r) = pads
    return np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)), constant_values=value)


def out_size(size, k, s, lo, hi, d=1):
    return (size + lo + hi - ((k - 1) * d + 1)) // s + 1


def conv2d(x, w, b, stride, pads, dilation=(1, 1)):
    """h[n,i,j,o] = sum_{k,l,c} w[k,l,c,o] xp[n, i*s+k*d, j*s+l*d, c] + b[o]."""
    n, h, wd, _ = x.shape
    kh, kw, _, co = w.shape
    xp = pad_nhwc(x, pads)
    oh = out_size(h, kh, stride[0], *pads[0], dilation[0])
    ow = out_size(wd, kw, stride[1], *pads[1], dilation[1])
    y = np.zeros((n, oh, ow, co))
    for i in range(oh):
        for j in range(ow):
            for k in range(kh):
                for l in range(kw):
                    r = i * stride[0] + k * dilation[0]
                    q = j * stride[1] + l * dilation[1]
                    y[:, i, j, :] += xp[:, r, q, :] @ w[k, l]
    return y + (0 if b is None else b)


def locally_connected2d(x, w, b, stride, pads, dilation=(1, 1)):
    n = x.shape[0]
    oh, ow, kh, kw, _, co = w.shape
    xp = pad_nhwc(x, pads)
    y = np.zeros((n, oh, ow, co))
    for i in range(oh):
        for j in range(ow):
            for k in range(kh):
                for l in range(kw):
                    r = i * stride[0] + k * dilation[0]
                    q = j * stride[1] + l * dilation[1]
                    y[:, i, j, :] += xp[:, r, q, :] @ w[i, j, k, l]
    return y + (0 if b is None else b)


def pool(x, window, stride, pads, kind, count_include_pad=True, p=2.0):
    """Spatial pooling by explicit loops over windows; pads never win a max."""
    n, h, wd, c = x.shape
    oh = out_size(h, window[0], stride[0], *pads[0])
    ow = out_size(wd, window[1], stride[1], *pads[1])
    y = np.zeros((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            r0, q0 = i * stride[0] - pads[0][0], j * stride[1] - pads[1][0]
            rows = [r for r in range(r0, r0 + window[0]) if 0 <= r < h]
            cols = [q for q in range(q0, q0 + window[1]) if 0 <= q < wd]
            win = x[:, rows][:, :, cols]  # only the real pixels
            if kind == "max":
                y[:, i, j] = win.max(axis=(1, 2))
            elif kind == "avg":
                k = window[0] * window[1] if count_include_pad else len(rows) * len(cols)
                y[:, i, j] = win.sum(axis=(1, 2)) / k
            elif kind == "lp":
                y[:, i, j] = (np.abs(win) ** p).sum(axis=(1, 2)) ** (1.0 / p)
            else:
                raise ValueError(kind)
    return y


def feature_pool(x, group_size, kind):
    c = x.shape[-1]
    out = []
    for j in range(c // group_size):
        group = x[..., j * group_size : (j + 1) * group_size]
        if kind == "max":
            out.append(group.max(axis=-1))
        else:
            out.append(np.sqrt((group**2).sum(axis=-1)))
    return np.stack(out, axis=-1)


def same_pads(size, k, s, d=1):
    """XLA/TensorFlow SAME: ceil(size/s) outputs, the odd pixel at the high end."""
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return (total // 2, total - total // 2)
