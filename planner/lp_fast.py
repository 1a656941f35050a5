"""A lean stand-in for the part of pulp's modelling API the stage MIP uses
(`planner.mip.build_stage_model`), handing HiGHS its rows in one call.

Why: building a 126-layer stage model with pulp's expression objects and passing it to HiGHS
one column and one row at a time cost more than HiGHS' own solve (issue 14, planner wall
time). Plans must not change, so this module reproduces pulp 3's arithmetic exactly: the same
coefficients accumulated in the same order with the same float operations, constants and
bounds the same, columns ordered by name and rows in insertion order, terms multiplied by 0
dropped as pulp drops them, zero coefficients left out of a row. HiGHS then gets the same
model, bit for bit (tests/test_lp_fast.py compares the two HiGHS models and their optima).

`Model.solve(solver)` takes the same solver objects as `pulp.LpProblem.solve`: a
`pulp.HiGHS` (or `planner.solve._HiGHS`) builds through `pass_to_highs`; any other solver
(CBC) solves an equivalent pulp model and the values are copied back.
"""

from __future__ import annotations

import math

import numpy as np
import pulp

LpContinuous, LpBinary, LpInteger = pulp.LpContinuous, pulp.LpBinary, pulp.LpInteger
LpMinimize = pulp.LpMinimize
_LE, _GE, _EQ = pulp.LpConstraintLE, pulp.LpConstraintGE, pulp.LpConstraintEQ


class Var:
    """A column: name, bounds (None: unbounded), category; `varValue` after a solve."""

    __slots__ = ("name", "lowBound", "upBound", "cat", "varValue", "dj", "index", "modified")

    def __init__(self, name: str, low=None, up=None, cat: str = LpContinuous):
        if cat == LpBinary:
            low, up, cat = 0, 1, LpInteger
        self.name, self.lowBound, self.upBound, self.cat = name, low, up, cat
        self.varValue = self.dj = self.index = None

    def value(self):
        return self.varValue

    def _expr(self) -> "Expr":
        e = Expr()
        e.constant = 0
        e[self] = 1
        return e

    # Each operator builds pulp's intermediate expression directly (the same terms, constant
    # and float operations, one temporary fewer): e.g. pulp's `x - y` copies `Expr(x)` first.
    def __add__(self, other):
        return self._expr().add(other)

    __radd__ = __add__

    def __sub__(self, other):
        return self._expr().add(other, -1)

    def __rsub__(self, other):   # other is a number here: -Expr(x) + other
        e = Expr()
        e.constant = 0
        e[self] = -1
        return e.add(other)

    def __mul__(self, other):
        if isinstance(other, (Expr, Var)):
            raise TypeError("only constant multiples of a variable are linear here")
        if not math.isfinite(other):
            raise ValueError("cannot multiply a variable by NaN/inf")
        e = Expr()
        if other != 0:
            e.constant = 0 * other
            e[self] = other * 1
        return e

    __rmul__ = __mul__

    def __neg__(self):
        return -self._expr()

    def __le__(self, other):
        expr = self._expr()
        return Con(expr, _LE, other) if isinstance(other, (int, float)) else Con(expr.add(other, -1), _LE)

    def __ge__(self, other):
        expr = self._expr()
        return Con(expr, _GE, other) if isinstance(other, (int, float)) else Con(expr.add(other, -1), _GE)

    __hash__ = object.__hash__

    def __repr__(self):
        return self.name


class Expr(dict):
    """Var -> coefficient plus a constant, with pulp's `LpAffineExpression` arithmetic."""

    __slots__ = ("constant",)

    def __init__(self, terms=(), constant=0.0):
        dict.__init__(self, terms)
        self.constant = constant

    def copy(self) -> "Expr":
        return Expr(self.items(), self.constant)

    def add(self, other, sign=1) -> "Expr":
        """In place, as pulp's `addInPlace` (terms in order, new ones appended)."""
        if isinstance(other, Var):
            if other in self:
                self[other] += sign
            else:
                self[other] = sign
        elif isinstance(other, int) and other == 0 or other is None:
            return self
        elif isinstance(other, Expr):
            self.constant += other.constant * sign
            for v, x in other.items():
                if v in self:
                    self[v] += x * sign
                else:
                    self[v] = x * sign
        elif hasattr(other, "__iter__"):
            for e in other:
                self.add(e, sign)
        elif not math.isfinite(other):
            raise ValueError("cannot add NaN/inf to an expression")
        else:
            self.constant += other * sign
        return self

    def __neg__(self):
        e = Expr(((v, -x) for v, x in self.items()))
        e.constant = -self.constant
        return e

    def __add__(self, other):
        return self.copy().add(other)

    __radd__ = __add__

    def __sub__(self, other):
        return self.copy().add(other, -1)

    def __rsub__(self, other):
        return (-self).add(other)

    def __mul__(self, other):
        if isinstance(other, (Expr, Var)):
            raise TypeError("only constant multiples of an expression are linear here")
        if not math.isfinite(other):
            raise ValueError("cannot multiply an expression by NaN/inf")
        e = Expr()
        if other != 0:
            e.constant = self.constant * other
            for v, x in self.items():
                e[v] = other * x
        return e

    __rmul__ = __mul__

    def __le__(self, other):
        return Con(self, _LE, other) if isinstance(other, (int, float)) else Con(self - other, _LE)

    def __ge__(self, other):
        return Con(self, _GE, other) if isinstance(other, (int, float)) else Con(self - other, _GE)

    def value(self):
        s = self.constant
        for v, x in self.items():
            if v.varValue is None:
                return None
            s += v.varValue * x
        return s

    __hash__ = None


class Con:
    """expr (sense) 0 with the constant moved to the bound, as `pulp.LpConstraint`."""

    def __init__(self, expr: Expr, sense: int, rhs=None):
        self.expr, self.sense, self.constant = expr, sense, expr.constant
        if rhs is not None:
            if not math.isfinite(rhs):
                raise ValueError("constraint right-hand side must be finite")
            self.constant -= rhs
        self.name = self.index = self.pi = self.slack = None

    def items(self):
        return self.expr.items()

    def keys(self):
        return self.expr.keys()

    def getLb(self):
        return -self.constant if self.sense in (_GE, _EQ) else None

    def getUb(self):
        return -self.constant if self.sense in (_LE, _EQ) else None

    def valid(self, eps: float = 0.0) -> bool:
        """Whether the variables' current values satisfy the row within `eps` (pulp's test)."""
        value = sum(v.varValue * x for v, x in self.items()) + self.constant
        return (value <= eps if self.sense == _LE else value >= -eps if self.sense == _GE
                else abs(value) <= eps)


def lpSum(vector) -> Expr:
    return Expr().add(vector)


class LpProblem:
    """The model: `+= (constraint, name)` adds a row, `+= (expression, name)` sets the objective."""

    def __init__(self, name: str = "NoName", sense: int = LpMinimize):
        if sense != LpMinimize:
            raise ValueError("only minimisation is supported")
        self.name, self.sense = name, sense
        self.objective: Expr | None = None
        self._constraints: dict[str, Con] = {}
        self._variables: list[Var] | None = None
        self._rows = None
        self.status, self.sol_status = pulp.LpStatusNotSolved, pulp.LpSolutionNoSolutionFound
        self.solverModel = None

    def add_variable(self, name: str, lowBound=None, upBound=None, cat: str = LpContinuous) -> Var:
        return Var(name, lowBound, upBound, cat)

    def __iadd__(self, other):
        other, name = other if isinstance(other, tuple) else (other, None)
        self._variables = self._rows = None
        if isinstance(other, Con):
            name = name or f"_C{len(self._constraints) + 1}"
            if name in self._constraints:
                raise ValueError(f"overlapping constraint names: {name}")
            other.name = name
            self._constraints[name] = other
        elif isinstance(other, Expr):
            self.objective = other
        else:
            raise TypeError("add a constraint or an expression")
        return self

    def variables(self) -> list[Var]:
        """Every variable of the objective or a row (zero coefficients included), by name."""
        if self._variables is None:
            seen = dict.fromkeys(self.objective or ())
            for con in self._constraints.values():
                seen.update(dict.fromkeys(con.expr))
            self._variables = sorted(seen, key=lambda v: v.name)
        return self._variables

    def valid(self, eps: float = 0.0) -> bool:
        """Whether every row holds at the variables' current values (`pulp.LpProblem.valid`)."""
        return all(con.valid(eps) for con in self._constraints.values())

    def isMIP(self) -> int:
        return int(any(v.cat == LpInteger for v in self.variables()))

    def assignStatus(self, status, sol_status=None) -> bool:
        self.status = status
        self.sol_status = (pulp.LpStatusToSolution.get(status, pulp.LpSolutionNoSolutionFound)
                           if sol_status is None else sol_status)
        return True

    def _row_arrays(self):
        if self._rows is None:
            for i, v in enumerate(self.variables()):
                v.index = i
            starts, index, value = [0], [], []
            for i, con in enumerate(self._constraints.values()):
                con.index = i
                for v, x in con.expr.items():
                    if x != 0:
                        index.append(v.index)
                        value.append(x)
                starts.append(len(index))
            self._rows = (np.array(starts[:-1], dtype=np.int32), np.array(index, dtype=np.int32),
                          np.array(value, dtype=np.float64))
        return self._rows

    def pass_to_highs(self, highs, mip: bool) -> None:
        """Columns (cost, bounds, integrality when `mip`) and rows into a fresh `highspy.Highs`."""
        import highspy
        starts, index, value = self._row_arrays()
        variables, inf = self.variables(), highspy.kHighsInf
        objective = self.objective or {}
        cost = np.array([objective.get(v, 0.0) for v in variables], dtype=np.float64)
        low = np.array([-inf if v.lowBound is None else v.lowBound for v in variables], dtype=np.float64)
        up = np.array([inf if v.upBound is None else v.upBound for v in variables], dtype=np.float64)
        empty_i, empty_f = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float64)
        highs.addCols(len(variables), cost, low, up, 0, empty_i, empty_i, empty_f)
        integers = [v.index for v in variables if v.cat == LpInteger] if mip else []
        if integers:
            kind = np.full(len(integers), int(highspy.HighsVarType.kInteger), dtype=np.uint8)
            highs.changeColsIntegrality(len(integers), np.array(integers, dtype=np.int32), kind)
        rows = list(self._constraints.values())
        row_low = np.array([-inf if c.getLb() is None else c.getLb() for c in rows], dtype=np.float64)
        row_up = np.array([inf if c.getUb() is None else c.getUb() for c in rows], dtype=np.float64)
        highs.addRows(len(rows), row_low, row_up, len(index), starts, index, value)

    def solve(self, solver) -> int:
        if isinstance(solver, pulp.HiGHS):
            return solver.actualSolve(self)
        prob, twins = self.as_pulp()
        status = prob.solve(solver)
        for v, twin in twins.items():
            v.varValue = twin.varValue
        self.assignStatus(prob.status, prob.sol_status)
        return status

    def as_pulp(self) -> tuple[pulp.LpProblem, dict[Var, pulp.LpVariable]]:
        """The same model in pulp (for solvers other than HiGHS) and each Var's twin."""
        prob = pulp.LpProblem(self.name, self.sense)
        twins = {v: prob.add_variable(v.name, v.lowBound, v.upBound, v.cat) for v in self.variables()}

        def twin(e: Expr) -> pulp.LpAffineExpression:
            return pulp.LpAffineExpression([(twins[v], x) for v, x in e.items()], constant=e.constant)

        for name, con in self._constraints.items():
            prob += pulp.LpConstraint(twin(con.expr), con.sense, rhs=con.expr.constant - con.constant), name
        if self.objective is not None:
            prob += twin(self.objective)
        return prob, twins
