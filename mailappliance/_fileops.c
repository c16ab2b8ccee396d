/* mailappliance_fileops: a batch of file system calls in one call that releases the GIL once.
 *
 * Why (docs/ARCHITECTURE.md, "Threads, the GIL and batches"): a pool thread gives up the GIL
 * for every system call and must win it back from the reactor thread afterwards. While the
 * reactor is busy that takes up to the interpreter's switch interval (5 ms) per call, so a
 * group commit of N messages made of ~6N separate os.* calls spends most of its time waiting
 * for the GIL, not for the disk. These functions do the same calls, in the same order and with
 * the same per-file outcome, with the GIL released around the whole loop.
 *
 * Optional: setup.py builds it when a C compiler is there; FileOps (mailappliance/fileops.py)
 * falls back to the same steps in Python, and always takes that path for a FileOps subclass
 * (tests that make a chosen call fail). Built as the top-level module mailappliance_fileops
 * (setup.py says why).
 *
 *   create_files(paths, mode, create=True) -> [(fd, inode) | (-errno, 0)]
 *       open(O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC) and fstat each path; with create false,
 *       open(O_WRONLY|O_CLOEXEC) an existing file instead (the queue's recycled files).
 *   commit(items, dirs, writeback) -> ([None | (step, errno)], [errno])
 *       items: (fd, data or None, src or None, dst or None[, size]). Write all data of every
 *       item, then ftruncate it to size when one is given (>= 0; a failure is step 1);
 *       with writeback and more than one item, POSIX_FADV_DONTNEED each (starts writeback);
 *       then per item fsync, close, rename(src, dst). An item stops at its first failing step
 *       (1 write, 2 fsync, 3 close, 4 rename); its fd is still open after a failed write or
 *       fsync, closed after the others. Then fsync each dir (a path, or an open fd).
 *   unlink_many(paths) -> [errno or 0]
 *   rename_many(srcs, dsts) -> [errno or 0]
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum { ST_OK = 0, ST_WRITE = 1, ST_FSYNC = 2, ST_CLOSE = 3, ST_RENAME = 4 };

/* A sequence of str/bytes/PathLike -> array of bytes objects (new references). */
static PyObject **convert_paths(PyObject *seq, Py_ssize_t n) {
    PyObject **conv = PyMem_Calloc(n ? n : 1, sizeof(PyObject *));
    if (!conv) { PyErr_NoMemory(); return NULL; }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyUnicode_FSConverter(PySequence_Fast_GET_ITEM(seq, i), &conv[i])) {
            for (Py_ssize_t j = 0; j < i; j++) Py_DECREF(conv[j]);
            PyMem_Free(conv);
            return NULL;
        }
    }
    return conv;
}

static void free_paths(PyObject **conv, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) Py_XDECREF(conv[i]);
    PyMem_Free(conv);
}

static PyObject *create_files(PyObject *self, PyObject *args) {
    PyObject *paths;
    int mode = 0600, create = 1;
    if (!PyArg_ParseTuple(args, "O|ip:create_files", &paths, &mode, &create)) return NULL;
    PyObject *seq = PySequence_Fast(paths, "paths must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **conv = convert_paths(seq, n);
    if (!conv) { Py_DECREF(seq); return NULL; }
    long long *res = PyMem_Calloc(n ? 2 * n : 1, sizeof(long long));
    if (!res) { free_paths(conv, n); Py_DECREF(seq); return PyErr_NoMemory(); }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *path = PyBytes_AS_STRING(conv[i]);
        int fd = create ? open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
                        : open(path, O_WRONLY | O_CLOEXEC);
        if (fd < 0) { res[2 * i] = -errno; continue; }
        struct stat st;
        if (fstat(fd, &st) < 0) {
            int e = errno;
            close(fd);
            if (create) unlink(path);
            res[2 * i] = -e;
            continue;
        }
        res[2 * i] = fd;
        res[2 * i + 1] = (long long)st.st_ino;
    }
    Py_END_ALLOW_THREADS
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out && i < n; i++) {
        PyObject *t = Py_BuildValue("(LL)", res[2 * i], res[2 * i + 1]);
        if (!t) { Py_CLEAR(out); break; }
        PyList_SET_ITEM(out, i, t);
    }
    if (!out) {         /* cannot report: close what was opened rather than leak it */
        for (Py_ssize_t i = 0; i < n; i++)
            if (res[2 * i] >= 0) {
                close((int)res[2 * i]);
                if (create) unlink(PyBytes_AS_STRING(conv[i]));
            }
    }
    PyMem_Free(res);
    free_paths(conv, n);
    Py_DECREF(seq);
    return out;
}

typedef struct {
    int fd;
    int has_data;
    Py_buffer data;
    PyObject *src, *dst;          /* bytes, or NULL */
    long long size;               /* >= 0: ftruncate to it after the write */
    int step, err;
} item_t;

typedef struct {
    int fd;                       /* >= 0: an open directory given by the caller */
    PyObject *path;               /* bytes, or NULL */
    int err;
} dir_t;

static PyObject *commit(PyObject *self, PyObject *args) {
    PyObject *items_obj, *dirs_obj, *out = NULL;
    int writeback = 1;
    if (!PyArg_ParseTuple(args, "OO|p:commit", &items_obj, &dirs_obj, &writeback)) return NULL;
    PyObject *items = PySequence_Fast(items_obj, "items must be a sequence");
    if (!items) return NULL;
    PyObject *dirs = PySequence_Fast(dirs_obj, "dirs must be a sequence");
    if (!dirs) { Py_DECREF(items); return NULL; }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(items), nd = PySequence_Fast_GET_SIZE(dirs);
    item_t *it = PyMem_Calloc(n ? n : 1, sizeof(item_t));
    dir_t *dv = PyMem_Calloc(nd ? nd : 1, sizeof(dir_t));
    if (!it || !dv) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *data, *src, *dst;
        it[i].size = -1;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(items, i), "iOOO|L:commit item",
                              &it[i].fd, &data, &src, &dst, &it[i].size))
            goto done;
        if (data != Py_None) {
            if (PyObject_GetBuffer(data, &it[i].data, PyBUF_SIMPLE) < 0) goto done;
            it[i].has_data = 1;
        }
        if (src != Py_None && !PyUnicode_FSConverter(src, &it[i].src)) goto done;
        if (dst != Py_None && !PyUnicode_FSConverter(dst, &it[i].dst)) goto done;
        if ((it[i].src == NULL) != (it[i].dst == NULL)) {
            PyErr_SetString(PyExc_ValueError, "commit item: src and dst go together");
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < nd; i++) {
        PyObject *d = PySequence_Fast_GET_ITEM(dirs, i);
        dv[i].fd = -1;
        if (PyLong_Check(d)) {
            dv[i].fd = PyLong_AsLong(d);
            if (dv[i].fd < 0) { if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad fd"); goto done; }
        } else if (!PyUnicode_FSConverter(d, &dv[i].path)) {
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!it[i].has_data) continue;
        const char *p = it[i].data.buf;
        Py_ssize_t left = it[i].data.len;
        while (left > 0) {
            ssize_t w = write(it[i].fd, p, (size_t)left);
            if (w < 0) {
                if (errno == EINTR) continue;
                it[i].step = ST_WRITE; it[i].err = errno;
                break;
            }
            if (w == 0) { it[i].step = ST_WRITE; it[i].err = EIO; break; }
            p += w; left -= w;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (!it[i].step && it[i].size >= 0 && ftruncate(it[i].fd, (off_t)it[i].size) < 0) {
            it[i].step = ST_WRITE; it[i].err = errno;
        }
    if (writeback && n > 1)
        for (Py_ssize_t i = 0; i < n; i++)
            if (!it[i].step) (void)posix_fadvise(it[i].fd, 0, 0, POSIX_FADV_DONTNEED);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (it[i].step) continue;
        if (fsync(it[i].fd) < 0) { it[i].step = ST_FSYNC; it[i].err = errno; continue; }
        int rc = close(it[i].fd);
        it[i].fd = -1;            /* closed even on error (Linux) */
        if (rc < 0 && errno != EINTR) { it[i].step = ST_CLOSE; it[i].err = errno; continue; }
        if (it[i].src && rename(PyBytes_AS_STRING(it[i].src), PyBytes_AS_STRING(it[i].dst)) < 0) {
            it[i].step = ST_RENAME; it[i].err = errno;
        }
    }
    for (Py_ssize_t i = 0; i < nd; i++) {
        int fd = dv[i].fd;
        if (fd < 0) {
            fd = open(PyBytes_AS_STRING(dv[i].path), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
            if (fd < 0) { dv[i].err = errno; continue; }
        }
        if (fsync(fd) < 0) dv[i].err = errno;
        if (fd != dv[i].fd) close(fd);
    }
    Py_END_ALLOW_THREADS
    {
        PyObject *ires = PyList_New(n), *dres = PyList_New(nd);
        if (!ires || !dres) { Py_XDECREF(ires); Py_XDECREF(dres); goto done; }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *r = it[i].step ? Py_BuildValue("(ii)", it[i].step, it[i].err)
                                     : (Py_INCREF(Py_None), Py_None);
            if (!r) { Py_DECREF(ires); Py_DECREF(dres); goto done; }
            PyList_SET_ITEM(ires, i, r);
        }
        for (Py_ssize_t i = 0; i < nd; i++) {
            PyObject *r = PyLong_FromLong(dv[i].err);
            if (!r) { Py_DECREF(ires); Py_DECREF(dres); goto done; }
            PyList_SET_ITEM(dres, i, r);
        }
        out = PyTuple_Pack(2, ires, dres);
        Py_DECREF(ires);
        Py_DECREF(dres);
    }
done:
    if (it) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (it[i].has_data) PyBuffer_Release(&it[i].data);
            Py_XDECREF(it[i].src);
            Py_XDECREF(it[i].dst);
        }
        PyMem_Free(it);
    }
    if (dv) {
        for (Py_ssize_t i = 0; i < nd; i++) Py_XDECREF(dv[i].path);
        PyMem_Free(dv);
    }
    Py_DECREF(items);
    Py_DECREF(dirs);
    return out;
}

/* unlink each path (dsts NULL), or rename each src to its dst, with the GIL released once. */
static PyObject *path_batch(PyObject *srcs, PyObject *dsts) {
    PyObject *seq = PySequence_Fast(srcs, "paths must be a sequence"), *seq2 = NULL;
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **conv = NULL, **conv2 = NULL, *out = NULL;
    int *err = NULL;
    if (dsts) {
        seq2 = PySequence_Fast(dsts, "paths must be a sequence");
        if (!seq2) goto done;
        if (PySequence_Fast_GET_SIZE(seq2) != n) {
            PyErr_SetString(PyExc_ValueError, "rename_many: as many targets as sources");
            goto done;
        }
        if (!(conv2 = convert_paths(seq2, n))) goto done;
    }
    if (!(conv = convert_paths(seq, n))) goto done;
    err = PyMem_Calloc(n ? n : 1, sizeof(int));
    if (!err) { PyErr_NoMemory(); goto done; }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *p = PyBytes_AS_STRING(conv[i]);
        if ((conv2 ? rename(p, PyBytes_AS_STRING(conv2[i])) : unlink(p)) < 0) err[i] = errno;
    }
    Py_END_ALLOW_THREADS
    out = PyList_New(n);
    for (Py_ssize_t i = 0; out && i < n; i++) {
        PyObject *r = PyLong_FromLong(err[i]);
        if (!r) { Py_CLEAR(out); break; }
        PyList_SET_ITEM(out, i, r);
    }
done:
    PyMem_Free(err);
    if (conv) free_paths(conv, n);
    if (conv2) free_paths(conv2, n);
    Py_XDECREF(seq2);
    Py_DECREF(seq);
    return out;
}

static PyObject *unlink_many(PyObject *self, PyObject *args) {
    PyObject *paths;
    if (!PyArg_ParseTuple(args, "O:unlink_many", &paths)) return NULL;
    return path_batch(paths, NULL);
}

static PyObject *rename_many(PyObject *self, PyObject *args) {
    PyObject *srcs, *dsts;
    if (!PyArg_ParseTuple(args, "OO:rename_many", &srcs, &dsts)) return NULL;
    return path_batch(srcs, dsts);
}

static PyMethodDef methods[] = {
    {"create_files", create_files, METH_VARARGS,
     "create_files(paths, mode=0o600, create=True) -> [(fd, inode) or (-errno, 0)]"},
    {"commit", commit, METH_VARARGS,
     "commit(items, dirs, writeback=True) -> ([None or (step, errno)], [errno or 0])"},
    {"unlink_many", unlink_many, METH_VARARGS, "unlink_many(paths) -> [errno or 0]"},
    {"rename_many", rename_many, METH_VARARGS, "rename_many(srcs, dsts) -> [errno or 0]"},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "mailappliance_fileops",
    "Batches of file system calls with the GIL released once (see FileOps).", -1, methods
};

PyMODINIT_FUNC PyInit_mailappliance_fileops(void) { return PyModule_Create(&module); }
