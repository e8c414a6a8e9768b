"""Prefix store: cache states of earlier requests, keyed by their token ids, in a radix tree.

Each node holds an edge of token ids and, for every layer, the cache state of exactly those
positions (``[1, heads, len(edge), width]`` arrays), so a prefix shared by many requests (a
system prompt, an agent's history) is stored once. A lookup walks the tree along a new prompt and
returns the states of its longest cached prefix; since caches of causal models only depend on
the tokens before them, any common prefix of a stored sequence is reusable, even one that ends
inside an edge. The store is bounded by bytes: the least recently used leaves go first (a node
becomes a leaf when its children are gone).

This is server-side bookkeeping: it knows nothing of models, only of per-layer lists of arrays
(``cache.state`` / ``cache.load``).
"""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np


class _Node:
    __slots__ = ("edge", "states", "children", "parent", "used")

    def __init__(self, edge: np.ndarray, states: list[list[mx.array]], parent: _Node | None):
        self.edge = edge  # token ids of this node's positions
        self.states = states  # per layer, per cache array: [1, heads, len(edge), width]
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.used = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for layer in self.states for a in layer)


def _slice(states: list[list[mx.array]], start: int, end: int) -> list[list[mx.array]]:
    """Positions ``[start, end)`` of every array, as arrays of their own (a view would keep the
    whole source buffer alive)."""
    return [[mx.contiguous(a[:, :, start:end]) for a in layer] for layer in states]


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class PrefixStore:
    """Radix tree of cache states, bounded by ``max_bytes`` with LRU eviction of leaves.

    Args:
        max_bytes: most bytes of cache state kept (0 keeps nothing).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.root = _Node(np.zeros(0, np.int64), [], None)
        self.nbytes = 0
        self._clock = itertools.count(1)

    def _touch(self, node: _Node) -> None:
        t = next(self._clock)
        while node is not None:
            node.used = t
            node = node.parent

    def lookup(self, ids: list[int], limit: int | None = None) -> tuple[int, list[list[mx.array]]]:
        """Longest stored prefix of ``ids`` (at most ``limit`` tokens).

        Returns:
            ``(n, states)``: ``n`` tokens matched and, per layer, the cache arrays of those
            positions ``[1, heads, n, width]`` (``[]`` when ``n == 0``).
        """
        key = np.asarray(ids[:limit] if limit is not None else ids, np.int64)
        node, pos, pieces, last = self.root, 0, [], self.root
        while pos < len(key):
            child = node.children.get(int(key[pos]))
            if child is None:
                break
            k = common_prefix(child.edge, key[pos:])
            pieces.append([[a[:, :, :k] for a in layer] for layer in child.states])
            pos, last = pos + k, child
            if k < len(child.edge):
                break
            node = child
        if pos == 0:
            return 0, []
        self._touch(last)
        # pieces[node][layer][array] -> per layer, per array: the nodes' pieces joined
        states = []
        for layers in zip(*pieces, strict=True):
            arrays = zip(*layers, strict=True)
            states.append([mx.concatenate(p, axis=2) if len(p) > 1 else p[0] for p in arrays])
        return pos, states

    def insert(self, ids: list[int], states: list[list[mx.array]]) -> None:
        """Store the cache ``states`` (per layer, ``[1, heads, len(ids), width]`` arrays) of the
        positions of ``ids``; what is already stored is shared, not copied again."""
        key = np.asarray(ids, np.int64)
        if len(key) == 0 or self.max_bytes <= 0:
            return
        node, pos = self.root, 0
        while pos < len(key):
            child = node.children.get(int(key[pos]))
            if child is None:
                leaf = _Node(key[pos:].copy(), _slice(states, pos, len(key)), node)
                node.children[int(key[pos])] = leaf
                self._materialize(leaf)
                node = leaf
                break
            k = common_prefix(child.edge, key[pos:])
            if k < len(child.edge):
                self._split(child, k)
                child = node.children[int(key[pos])]
            node, pos = child, pos + k
        self._touch(node)
        self.evict()

    def _split(self, node: _Node, k: int) -> None:
        """Cut ``node``'s edge after ``k`` tokens: a new parent holds the first ``k``."""
        parent = node.parent
        head = _Node(node.edge[:k].copy(), _slice(node.states, 0, k), parent)
        head.used = node.used
        tail_states = _slice(node.states, k, len(node.edge))
        old = node.nbytes
        node.edge, node.states, node.parent = node.edge[k:].copy(), tail_states, head
        head.children[int(node.edge[0])] = node
        parent.children[int(head.edge[0])] = head
        # copies of the two halves replace the node's arrays
        mx.eval([head.states, node.states])
        self.nbytes += head.nbytes + node.nbytes - old

    def _materialize(self, node: _Node) -> None:
        # evaluate the copies now: a lazy slice would hold the source buffer (a batch cache)
        mx.eval(node.states)
        self.nbytes += node.nbytes

    def evict(self, limit: int | None = None) -> int:
        """Drop least recently used leaves until at most ``limit`` bytes (``max_bytes`` by
        default) are held; returns the bytes freed."""
        limit = self.max_bytes if limit is None else limit
        freed = 0
        while self.nbytes > limit and self.root.children:
            leaf = min(self._leaves(), key=lambda n: n.used)
            del leaf.parent.children[int(leaf.edge[0])]
            self.nbytes -= leaf.nbytes
            freed += leaf.nbytes
        return freed

    def clear(self) -> None:
        self.root.children.clear()
        self.nbytes = 0

    def _leaves(self):
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            if n.children:
                stack.extend(n.children.values())
            else:
                yield n

    @property
    def tokens(self) -> int:
        """Token positions held (shared prefixes counted once)."""
        total, stack = 0, list(self.root.children.values())
        while stack:
            n = stack.pop()
            total += len(n.edge)
            stack.extend(n.children.values())
        return total
