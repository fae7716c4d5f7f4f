"""Matrix products on strided views, from compiled code: BLAS's xgemm called directly.

NumPy reference: np.matmul (tests/test_kernels.py holds gemm equal to it).

numba's np.dot takes contiguous arrays only, so with it the fused step (kernels/step.py) would
copy each attention head's [T, hs] slice of the packed q, k, v (row stride 3C) into a buffer
before every product, and copy the result back: on the laptop shape that copying, and the array
views it makes row by row (each one an atomic reference count), cost more than the products. BLAS
itself reads any row stride (its lda): gemm(A, ta, B, tb, C, beta) passes the views as they are,
as NumPy's matmul does for the layer-by-layer path. It is the same library numba's np.dot
calls: SciPy's OpenBLAS (LP64) through scipy.linalg.cython_blas, here by its Fortran symbols
xgemm, registered with LLVM under names of our own so that cached code finds them again in a
new process (as numba's own helper functions are found).
"""
import ctypes

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from ._jit import jit

SYMBOLS = {types.float32: "numgpt_sgemm", types.float64: "numgpt_dgemm"}


def _register():
    """Point our symbol names at SciPy's sgemm and dgemm; False where SciPy is missing (the fused
    step, the only caller, is then never used: numgpt.parallel.fused_applies)."""
    try:
        from scipy.linalg import cython_blas
    except ImportError:
        return False
    import llvmlite.binding as llb
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
    get_ptr.restype, get_ptr.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    for sym, blas_name in ((SYMBOLS[types.float32], "sgemm"), (SYMBOLS[types.float64], "dgemm")):
        capsule = cython_blas.__pyx_capi__[blas_name]
        llb.add_symbol(sym, get_ptr(capsule, get_name(capsule)))
    return True


AVAILABLE = _register()


@intrinsic
def _xgemm(typingctx, ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc):
    """The Fortran call (column-major): C = op(A) op(B) + beta C, alpha 1; every argument by
    pointer (each scalar in a stack slot), the arrays by their data pointers."""
    arrays = (a, b, c)
    if not all(isinstance(x, types.Array) for x in arrays) or c.dtype not in SYMBOLS:
        raise TypingError("gemm takes float32 or float64 arrays")
    if a.dtype != c.dtype or b.dtype != c.dtype:
        raise TypingError("gemm takes three arrays of one dtype")
    sig = types.void(ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc)

    def codegen(context, builder, signature, args):
        ta_, tb_, m_, n_, k_, a_, lda_, b_, ldb_, beta_, c_, ldc_ = args
        i8, i32 = ir.IntType(8), ir.IntType(32)
        fl = context.get_value_type(c.dtype)
        p8, p32, pf = i8.as_pointer(), i32.as_pointer(), fl.as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [p8, p8, p32, p32, p32, pf, pf, p32, pf, p32, pf,
                                               pf, p32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, SYMBOLS[c.dtype])

        def slot(value, ty):
            ptr = cgutils.alloca_once(builder, ty)
            builder.store(value, ptr)
            return ptr

        def i32_slot(value):
            return slot(builder.trunc(value, i32), i32)

        def data(ty, value):
            return builder.bitcast(context.make_array(ty)(context, builder, value).data, pf)

        one = slot(context.get_constant(c.dtype, 1.0), fl)
        beta_v = slot(context.cast(builder, beta_, signature.args[9], c.dtype), fl)
        builder.call(fn, [slot(builder.trunc(ta_, i8), i8), slot(builder.trunc(tb_, i8), i8),
                          i32_slot(m_), i32_slot(n_), i32_slot(k_), one,
                          data(a, a_), i32_slot(lda_), data(b, b_), i32_slot(ldb_), beta_v,
                          data(c, c_), i32_slot(ldc_)])
        return context.get_dummy_value()
    return sig, codegen


NO, YES = 78, 84  # BLAS's 'N' and 'T'


@jit()
def _rows_ok(X, size):
    """Whether BLAS can read X as it lies: adjacent elements within a row, rows in order and
    apart by at least a row (not broadcast, not overlapping), sizes in BLAS's 32-bit ints."""
    return ((X.shape[1] <= 1 or X.strides[1] == size)
            and (X.shape[0] <= 1 or X.strides[0] >= X.shape[1] * size)
            and X.strides[0] >= 0 and X.strides[0] // size < 2 ** 31
            and X.shape[0] < 2 ** 31 and X.shape[1] < 2 ** 31)


@jit()
def gemm(A, transA, B, transB, C, beta):
    """C [m, n] = op(A) @ op(B) + beta * C, where op(X) is X.T when transX. A, B and C are 2-D
    arrays of one dtype (float32 or float64) whose rows may be any distance apart but whose
    elements within a row are adjacent (a column slice of a C-ordered array); C must not overlap
    A or B. beta 0 ignores what C held (NaN included)."""
    m, n = C.shape
    k = A.shape[0] if transA else A.shape[1]
    ra, ca = (A.shape[1], A.shape[0]) if transA else (A.shape[0], A.shape[1])
    rb, cb = (B.shape[1], B.shape[0]) if transB else (B.shape[0], B.shape[1])
    if ra != m or cb != n or rb != ca:
        raise ValueError("gemm: shapes do not match")
    if m == 0 or n == 0:
        return
    if k == 0:  # BLAS's answer for an empty sum
        for i in range(m):
            for j in range(n):
                C[i, j] = 0 if beta == 0 else C[i, j] * beta
        return
    size = C.itemsize
    if not (_rows_ok(A, size) and _rows_ok(B, size) and _rows_ok(C, size)):
        raise ValueError("gemm: the elements of a row must be adjacent, rows in order and "
                         "apart, sizes below 2^31")
    # a row-major X with row stride ld is the column-major X^T with leading dimension ld, so
    # row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T
    lda = max(A.strides[0] // size, A.shape[1], 1)
    ldb = max(B.strides[0] // size, B.shape[1], 1)
    ldc = max(C.strides[0] // size, C.shape[1], 1)
    _xgemm(YES if transB else NO, YES if transA else NO, n, m, k, B, ldb, A, lda, beta, C, ldc)
