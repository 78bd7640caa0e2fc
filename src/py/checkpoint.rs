//! `zeroload._core.Checkpoint`: an open, parsed checkpoint, and the conversion of its
//! object graph into Python objects.
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::PyIndexError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyFrozenSet, PyList, PySet, PyTuple};
use pyo3::IntoPyObjectExt;

use super::dlpack::{capsule, check_dims, DLPackView};
use super::errors::{catch_panic, CheckpointError};
use crate::checkpoint::Checkpoint;
use crate::dlpack::Export;
use crate::dtype::DType;
use crate::format::{ObjId, Value};

/// Dtypes whose typed DLPack export a consumer refused (bit `dtype as u32`): older torch
/// builds cannot import some (float8, uint16 and wider). Kept for one call only (one
/// `export_tensors` asks once per dtype, not once per tensor): a later call asks again,
/// so one failure (transient, or a `make` that differs) never refuses a dtype for good.
#[derive(Default)]
struct Refused(u64);

impl Refused {
    fn has(&self, d: DType) -> bool {
        self.0 & dtype_bit(d) != 0
    }
    fn add(&mut self, d: DType) {
        self.0 |= dtype_bit(d);
    }
}

fn dtype_bit(d: DType) -> u64 {
    1u64 << (d as u32)
}

/// How deep containers may nest before the conversion refuses (a legitimate checkpoint
/// nests a handful of levels; the graph itself is bounded by the pickle's size).
const MAX_NESTING: usize = 1000;

/// An open checkpoint. Holds the mapping alive for as long as Python refers to it or to
/// any tensor exported from it.
#[pyclass(module = "zeroload._core", name = "Checkpoint", frozen)]
pub struct PyCheckpoint {
    pub(crate) inner: Arc<Checkpoint>,
    /// The mapping, as the owner every export keeps alive.
    owner: crate::dlpack::Owner,
}

impl PyCheckpoint {
    fn storage_at(&self, i: usize) -> PyResult<&crate::format::Storage> {
        self.inner
            .parsed
            .storages
            .get(i)
            .ok_or_else(|| PyIndexError::new_err(format!("no storage #{i}")))
    }

    /// The address of byte `offset` of the mapping. Exports point `data` at their first
    /// byte with a zero `byte_offset`: torch turns a non-zero byte_offset into a storage
    /// offset, which would give every tensor a storage spanning the file from its start.
    fn data_ptr(&self, offset: u64) -> *mut u8 {
        // Offsets come from validated storages, inside the mapping; wrapping_add keeps
        // the arithmetic itself free of undefined behaviour regardless.
        self.inner.mapping.base_ptr().wrapping_add(offset as usize)
    }

    /// Where storage `s`'s bytes can be exported from, and what keeps them alive: the
    /// mapping, or a copy of its own for a storage `unaligned_storages` lists (read with
    /// `pread`, aligned for any dtype; each call makes a new one, which its exports own).
    fn storage_memory(&self, s: usize) -> PyResult<(crate::dlpack::Owner, *mut u8)> {
        let st = self.storage_at(s)?;
        if self.inner.storage_aligned(s) {
            return Ok((self.owner.clone(), self.data_ptr(st.offset)));
        }
        let too_large = || {
            CheckpointError::new_err(format!(
                "{}: storage {:?} ({} bytes) is too large to copy into memory",
                self.inner.path.display(),
                st.key,
                st.nbytes
            ))
        };
        let len = usize::try_from(st.nbytes).map_err(|_| too_large())?;
        let mut copy = crate::dlpack::OwnedBytes::zeroed(len).ok_or_else(too_large)?;
        self.inner
            .mapping
            .read_at(copy.as_mut_slice(), st.offset)
            .map_err(PyErr::from)?;
        let ptr = copy.as_ptr();
        Ok((Arc::new(copy), ptr))
    }

    /// Tensor `i`, for anything that builds or reads it: a `CheckpointError` naming the
    /// tensor and its dtype if torch cannot hold it (see `Unrepresentable`).
    fn tensor_at(&self, i: usize) -> PyResult<&crate::format::Tensor> {
        let t = self.tensor_entry(i)?;
        if let Some(u) = self.inner.parsed.unrepresentable(i) {
            let name = self
                .inner
                .parsed
                .storages
                .get(t.storage)
                .map_or_else(|| format!("#{i}"), |s| format!("{:?}", s.key));
            return Err(CheckpointError::new_err(format!(
                "{}: tensor {name} (dtype {}, shape {:?}) cannot be loaded: {}",
                self.inner.path.display(),
                u.dtype,
                u.shape,
                u.why
            )));
        }
        Ok(t)
    }

    /// Tensor `i`'s entry in the table, loadable or not (for descriptions only).
    fn tensor_entry(&self, i: usize) -> PyResult<&crate::format::Tensor> {
        self.inner
            .parsed
            .tensors
            .get(i)
            .ok_or_else(|| PyIndexError::new_err(format!("no tensor #{i}")))
    }

    /// `make(capsule)` for tensor `i`, exported with its own dtype, shape and strides,
    /// if it covers its storage exactly, does not require grad, and its dtype was not
    /// refused earlier in this call (`refused`); `None` otherwise. An `Exception` from
    /// `make` marks the dtype in `refused` and gives `None` (the caller then builds the
    /// tensor from its storage); other `BaseException`s (KeyboardInterrupt) propagate.
    fn make_typed(
        &self,
        py: Python<'_>,
        i: usize,
        make: &Bound<'_, PyAny>,
        refused: &mut Refused,
    ) -> PyResult<Option<Py<PyAny>>> {
        let t = self.tensor_at(i)?;
        if t.requires_grad
            || t.dtype.dlpack().is_none()
            || refused.has(t.dtype)
            || !self.inner.covers_storage(i)
            || !self.inner.storage_aligned(t.storage)
        {
            return Ok(None);
        }
        let s = self.storage_at(t.storage)?;
        let (shape, strides) = check_dims(&t.shape, &t.strides)?;
        let export = Export {
            owner: &self.owner,
            data: self.data_ptr(s.offset),
            byte_offset: 0,
            dtype: t.dtype,
            shape: &shape,
            strides: &strides,
        };
        // Legacy capsules: every torch since 1.x imports them.
        let cap = capsule(py, &export, false)?;
        match make.call1((cap,)) {
            Ok(tensor) => Ok(Some(tensor.unbind())),
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyException>(py) => {
                refused.add(t.dtype);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

type TensorTuple = (usize, &'static str, Vec<u64>, Vec<i64>, u64, bool);

#[pymethods]
impl PyCheckpoint {
    /// Opens, maps and parses a checkpoint file (GIL released while parsing).
    #[staticmethod]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| {
            catch_panic(&path, "opening and parsing it", || {
                Checkpoint::open(&path).map_err(PyErr::from)
            })
        })?;
        let owner: crate::dlpack::Owner = inner.mapping.clone();
        Ok(PyCheckpoint {
            inner: Arc::new(inner),
            owner,
        })
    }

    /// A checkpoint held in memory: each item of `chunks` (`bytes`) is written, in order,
    /// into an anonymous in-memory file (Linux `memfd_create`), sealed, mapped and parsed
    /// with the same validation as a file; `name` stands for the path in errors.
    #[staticmethod]
    fn from_memory(py: Python<'_>, chunks: &Bound<'_, PyAny>, name: PathBuf) -> PyResult<Self> {
        use std::io::Write;
        let mut failure: Option<PyErr> = None;
        let mapping = crate::mapping::Mapping::anonymous(&name, |file| {
            let mut write = || -> PyResult<()> {
                for chunk in chunks.try_iter()? {
                    let chunk = chunk?;
                    let bytes = chunk.cast::<PyBytes>().map_err(PyErr::from)?;
                    let data: &[u8] = bytes.as_bytes();
                    // `bytes` are immutable and `chunk` holds this one alive.
                    py.detach(|| file.write_all(data))?;
                }
                Ok(())
            };
            write().map_err(|e| {
                failure = Some(e);
                std::io::Error::other("interrupted")
            })
        });
        if let Some(e) = failure {
            return Err(e);
        }
        let mapping = mapping.map_err(PyErr::from)?;
        let inner = py.detach(|| {
            catch_panic(&name, "parsing it", || {
                let parsed =
                    crate::checkpoint::parse_mapped(&name, &mapping).map_err(PyErr::from)?;
                Ok(Checkpoint::new(&name, mapping.clone(), parsed))
            })
        })?;
        let owner: crate::dlpack::Owner = inner.mapping.clone();
        Ok(PyCheckpoint {
            inner: Arc::new(inner),
            owner,
        })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path.clone()
    }

    /// "safetensors" or "torch zip".
    #[getter]
    fn format(&self) -> &'static str {
        self.inner.parsed.format.name()
    }

    #[getter]
    fn file_size(&self) -> u64 {
        self.inner.mapping.len()
    }

    /// safetensors `__metadata__`, or None.
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(pairs) = &self.inner.parsed.metadata else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        for (k, v) in pairs {
            d.set_item(k, v)?;
        }
        Ok(Some(d))
    }

    #[getter]
    fn num_storages(&self) -> usize {
        self.inner.parsed.storages.len()
    }

    #[getter]
    fn num_tensors(&self) -> usize {
        self.inner.parsed.tensors.len()
    }

    /// `(key, file offset, nbytes, saved location)` of storage `i`.
    fn storage(&self, i: usize) -> PyResult<(String, u64, u64, String)> {
        let s = self.storage_at(i)?;
        Ok((s.key.clone(), s.offset, s.nbytes, s.location.clone()))
    }

    /// `(storage, dtype name, shape, stride, storage_offset, requires_grad)` of tensor `i`;
    /// the dtype is the attribute name in `torch`.
    fn tensor(&self, i: usize) -> PyResult<TensorTuple> {
        let t = self.tensor_at(i)?;
        Ok(tensor_tuple(t))
    }

    /// `tensor(i)` for every tensor, in one call (raising like `tensor(i)` if one of them
    /// cannot be loaded).
    fn tensors(&self) -> PyResult<Vec<TensorTuple>> {
        if let Some(u) = self.inner.parsed.unrepresentable.first() {
            self.tensor_at(u.tensor)?;
        }
        Ok(self.inner.parsed.tensors.iter().map(tensor_tuple).collect())
    }

    /// `(dtype, shape, offset)` of tensor `i`: the dtype and shape as safetensors names
    /// and counts them ("F4" and twice torch's last dimension for the packed 4-bit float;
    /// the torch name for types safetensors lacks), and the file offset of its first
    /// byte; whether or not torch can hold it.
    fn describe(&self, i: usize) -> PyResult<(String, Vec<u64>, u64)> {
        let t = self.tensor_entry(i)?;
        let s = self.storage_at(t.storage)?;
        let offset = s
            .offset
            .saturating_add(t.storage_offset.saturating_mul(t.dtype.size() as u64));
        if let Some(u) = self.inner.parsed.unrepresentable(i) {
            return Ok((u.dtype.clone(), u.shape.clone(), offset));
        }
        let name = t.dtype.safetensors_name().unwrap_or(t.dtype.torch_name());
        let shape = crate::format::safetensors::logical_shape(t.dtype, &t.shape);
        Ok((name.to_string(), shape, offset))
    }

    /// Whether tensor `i` can be loaded (torch has its dtype).
    fn loadable(&self, i: usize) -> PyResult<bool> {
        self.tensor_entry(i)?;
        Ok(self.inner.parsed.unrepresentable(i).is_none())
    }

    /// `[(name, tensor index)]` when the checkpoint is a flat dict of tensors, else None.
    fn flat_tensors(&self) -> Option<Vec<(String, usize)>> {
        self.inner.flat_tensors()
    }

    /// The tensor index when the checkpoint is one tensor (`torch.save(tensor, path)`,
    /// a `Parameter` included), else None.
    fn single_tensor(&self) -> Option<usize> {
        self.inner.single_tensor()
    }

    /// `{name: tensor index}` when the checkpoint is a flat dict of tensors (in the dict's
    /// order), else None: the index a lazy handle looks names up in.
    fn flat_index<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(flat) = self.inner.flat_tensors() else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        for (name, i) in flat {
            d.set_item(name, i)?;
        }
        Ok(Some(d))
    }

    /// Tensor `i` as `make(capsule)` of a typed DLPack export (`make` is e.g.
    /// `torch.from_dlpack`), when the tensor is its whole storage and needs nothing
    /// more (see `covers_storage`); None otherwise: build it from `storage_view`.
    fn export_tensor(
        &self,
        py: Python<'_>,
        i: usize,
        make: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Py<PyAny>>> {
        self.make_typed(py, i, make, &mut Refused::default())
    }

    /// `export_tensor` for many tensors at once, for loads: a list indexed like the
    /// tensor table, holding `make(capsule)` for each tensor of `indices` (all when None)
    /// that `export_tensor` can make and whose storage nothing else uses (shared storages
    /// must come out as one storage object), None everywhere else.
    #[pyo3(signature = (indices, make))]
    fn export_tensors<'py>(
        &self,
        py: Python<'py>,
        indices: Option<Vec<usize>>,
        make: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let n = self.inner.parsed.tensors.len();
        let mut out: Vec<Option<Py<PyAny>>> = (0..n).map(|_| None).collect();
        let mut refused = Refused::default();
        let mut one = |i: usize| -> PyResult<()> {
            let t = self.tensor_at(i)?;
            if !self.inner.storage_shared(t.storage) {
                out[i] = self.make_typed(py, i, make, &mut refused)?;
            }
            Ok(())
        };
        match indices {
            None => (0..n).try_for_each(&mut one)?,
            Some(ids) => ids.into_iter().try_for_each(&mut one)?,
        }
        PyList::new(py, out)
    }

    /// Starts reading the given storages (all when None) into the page cache on a
    /// background thread (`posix_fadvise(WILLNEED)`, in the order given; nothing is
    /// mapped, so RSS does not grow), unless they add up to more than `max_bytes`.
    /// Returns the bytes scheduled.
    #[pyo3(signature = (storages=None, max_bytes=None))]
    fn readahead(&self, storages: Option<Vec<usize>>, max_bytes: Option<u64>) -> u64 {
        self.inner.readahead(storages.as_deref(), max_bytes)
    }

    /// `readahead` of byte ranges `(offset, nbytes)` of the file, in the order given
    /// (clipped to the file): the parts of tensors a load maps without reading them, such
    /// as a rank's shards. Returns the bytes scheduled.
    #[pyo3(signature = (ranges, max_bytes=None))]
    fn readahead_ranges(&self, ranges: Vec<(u64, u64)>, max_bytes: Option<u64>) -> u64 {
        self.inner.mapping.readahead(&ranges, max_bytes)
    }

    /// Storage `i` as a 1-D uint8 DLPack view over the copy-on-write mapping (over a
    /// copy of its own for the storages `unaligned_storages` lists).
    fn storage_view(&self, i: usize) -> PyResult<DLPackView> {
        let s = self.storage_at(i)?;
        let nbytes = i64::try_from(s.nbytes)
            .map_err(|_| CheckpointError::new_err(format!("storage {:?} is too large", s.key)))?;
        let (owner, data) = self.storage_memory(i)?;
        Ok(DLPackView::new(
            owner,
            data,
            crate::dtype::DType::U8,
            vec![nbytes],
            vec![1],
        ))
    }

    /// The storages whose bytes are not aligned for their dtype in the file (legacy
    /// torch.save files): their views are copies, not views of the file.
    fn unaligned_storages(&self) -> Vec<usize> {
        self.inner.unaligned_storages().to_vec()
    }

    /// Tensor `i` as a DLPack view with its own dtype, shape and strides (for numpy); on
    /// a copy of its storage when that is not aligned (see `unaligned_storages`).
    fn tensor_view(&self, i: usize) -> PyResult<DLPackView> {
        let t = self.tensor_at(i)?;
        if t.dtype.dlpack().is_none() {
            return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                "DLPack cannot carry {}",
                t.dtype
            )));
        }
        let (shape, strides) = check_dims(&t.shape, &t.strides)?;
        // validate() proved the tensor's span lies inside the storage, so this cannot
        // overflow.
        let within = t.storage_offset * t.dtype.size() as u64;
        let (owner, data) = self.storage_memory(t.storage)?;
        Ok(DLPackView::new(
            owner,
            data.wrapping_add(within as usize),
            t.dtype,
            shape,
            strides,
        ))
    }

    /// Converts the object graph into Python objects. `builder` supplies what the core
    /// does not know about: `builder.tensors` (a sequence indexed like the tensor table),
    /// and callables `storage(i)`, `parameter(tensor, requires_grad)`, `size(tuple)`,
    /// `device(str)`, `dtype(name)`. Containers (`OrderedDict` and `Counter` too) are
    /// plain Python and made here.
    fn build(&self, py: Python<'_>, builder: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        catch_panic(&self.inner.path, "building its objects", || {
            self.build_objects(py, builder)
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Checkpoint({:?}, format={:?}, tensors={}, storages={})",
            self.inner.path,
            self.format(),
            self.num_tensors(),
            self.num_storages()
        )
    }
}

impl PyCheckpoint {
    fn build_objects(&self, py: Python<'_>, builder: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let graph = &self.inner.parsed.objects;

        let collections = py.import("collections")?;
        let mut conv = Converter {
            py,
            nodes: &graph.nodes,
            builder,
            tensors: builder.getattr("tensors")?,
            ordered_dict: collections.getattr("OrderedDict")?,
            counter: collections.getattr("Counter")?,
            done: (0..graph.nodes.len()).map(|_| None).collect(),
            in_progress: vec![false; graph.nodes.len()],
            path: self.inner.path.display().to_string(),
        };
        conv.convert(graph.root, 0)
    }
}

fn tensor_tuple(t: &crate::format::Tensor) -> TensorTuple {
    (
        t.storage,
        t.dtype.torch_name(),
        t.shape.clone(),
        t.strides.clone(),
        t.storage_offset,
        t.requires_grad,
    )
}

/// Walks the graph depth-first, converting each node once (shared nodes stay shared).
/// Mutable containers are registered before their children are converted, so cycles
/// through lists and dicts come out as cycles, as pickle would make them.
struct Converter<'a, 'py> {
    py: Python<'py>,
    nodes: &'a [Value],
    builder: &'a Bound<'py, PyAny>,
    tensors: Bound<'py, PyAny>,
    ordered_dict: Bound<'py, PyAny>,
    counter: Bound<'py, PyAny>,
    done: Vec<Option<Py<PyAny>>>,
    in_progress: Vec<bool>,
    path: String,
}

impl<'py> Converter<'_, 'py> {
    fn error(&self, message: String) -> PyErr {
        CheckpointError::new_err(format!("{}: data.pkl: {message}", self.path))
    }

    /// A builder call that failed on values from the file (`torch.device("foo:0")`, say):
    /// a `CheckpointError` naming the file, caused by the original exception. What is not
    /// an `Exception` (KeyboardInterrupt) passes unchanged.
    fn builder_error(&self, what: &str, e: PyErr) -> PyErr {
        if !e.is_instance_of::<pyo3::exceptions::PyException>(self.py) {
            return e;
        }
        let err = self.error(format!("cannot make {what}: {e}"));
        err.set_cause(self.py, Some(e));
        err
    }

    fn convert(&mut self, id: ObjId, depth: usize) -> PyResult<Py<PyAny>> {
        if let Some(Some(obj)) = self.done.get(id) {
            return Ok(obj.clone_ref(self.py));
        }
        let Some(node) = self.nodes.get(id) else {
            return Err(self.error(format!("object #{id} does not exist")));
        };
        if depth > MAX_NESTING {
            return Err(self.error(format!("containers nest deeper than {MAX_NESTING} levels")));
        }
        if self.in_progress[id] {
            return Err(self.error("an immutable container contains itself".into()));
        }
        self.in_progress[id] = true;
        let py = self.py;
        let d = depth + 1;
        let obj: Py<PyAny> = match node {
            Value::None => py.None(),
            Value::Bool(b) => b.into_py_any(py)?,
            Value::Int(i) => i.into_py_any(py)?,
            Value::BigInt(bytes) => py
                .get_type::<pyo3::types::PyInt>()
                .call_method(
                    "from_bytes",
                    (PyBytes::new(py, bytes), "little"),
                    Some(&[("signed", true)].into_py_dict(py)?),
                )?
                .unbind(),
            Value::Float(f) => f.into_py_any(py)?,
            Value::Complex(re, im) => pyo3::types::PyComplex::from_doubles(py, *re, *im)
                .into_any()
                .unbind(),
            Value::Str(s) => s.into_py_any(py)?,
            Value::Bytes(b) => PyBytes::new(py, b).into_any().unbind(),
            Value::ByteArray(b) => PyByteArray::new(py, b).into_any().unbind(),
            Value::Tuple(items) => {
                let items = self.convert_all(items, d)?;
                PyTuple::new(py, items)?.into_any().unbind()
            }
            Value::List(items) => {
                let list = PyList::empty(py);
                self.done[id] = Some(list.clone().into_any().unbind());
                for &item in items {
                    list.append(self.convert(item, d)?)?;
                }
                list.into_any().unbind()
            }
            Value::Set(items) => {
                let items = self.convert_all(items, d)?;
                PySet::new(py, items)
                    .map_err(|e| self.error(format!("set holds an unhashable item: {e}")))?
                    .into_any()
                    .unbind()
            }
            Value::FrozenSet(items) => {
                let items = self.convert_all(items, d)?;
                PyFrozenSet::new(py, items)
                    .map_err(|e| self.error(format!("frozenset holds an unhashable item: {e}")))?
                    .into_any()
                    .unbind()
            }
            Value::Dict(items) => {
                let dict = PyDict::new(py);
                self.done[id] = Some(dict.clone().into_any().unbind());
                self.fill_mapping(dict.as_any(), items, d)?;
                dict.into_any().unbind()
            }
            Value::OrderedDict { items, attrs } => {
                let od = self.ordered_dict.call0()?;
                self.done[id] = Some(od.clone().unbind());
                self.fill_mapping(&od, items, d)?;
                // As torch's weights_only unpickler does (`inst.__dict__.update(state)`):
                // plain instance attributes, never `setattr`, so a BUILD naming
                // `__class__` or `__dict__` cannot change the object's type.
                if !attrs.is_empty() {
                    let dict = od
                        .getattr("__dict__")
                        .map_err(|e| self.error(format!("OrderedDict state: {e}")))?;
                    for (name, value) in attrs {
                        let value = self.convert(*value, d)?;
                        dict.set_item(name.as_str(), value)
                            .map_err(|e| self.error(format!("OrderedDict state {name:?}: {e}")))?;
                    }
                }
                od.unbind()
            }
            Value::Counter(items) => {
                let dict = PyDict::new(py);
                self.fill_mapping(dict.as_any(), items, d)?;
                self.counter.call1((dict,))?.unbind()
            }
            Value::Size(dims) => self
                .builder
                .call_method1("size", (PyTuple::new(py, dims)?,))
                .map_err(|e| self.builder_error(&format!("torch.Size({dims:?})"), e))?
                .unbind(),
            Value::Device(s) => self
                .builder
                .call_method1("device", (s,))
                .map_err(|e| self.builder_error(&format!("torch.device({s:?})"), e))?
                .unbind(),
            Value::DType(dt) => self
                .builder
                .call_method1("dtype", (dt.torch_name(),))
                .map_err(|e| self.builder_error(&format!("torch.{}", dt.torch_name()), e))?
                .unbind(),
            Value::Storage(i) => self
                .builder
                .call_method1("storage", (*i,))
                .map_err(|e| self.builder_error(&format!("storage #{i}"), e))?
                .unbind(),
            Value::Tensor(i) => self.tensors.get_item(*i)?.unbind(),
            Value::Parameter {
                tensor,
                requires_grad,
            } => {
                let t = self.convert(*tensor, d)?;
                self.builder
                    .call_method1("parameter", (t, *requires_grad))
                    .map_err(|e| self.builder_error("an nn.Parameter", e))?
                    .unbind()
            }
        };
        self.in_progress[id] = false;
        self.done[id] = Some(obj.clone_ref(py));
        Ok(obj)
    }

    fn convert_all(&mut self, ids: &[ObjId], depth: usize) -> PyResult<Vec<Py<PyAny>>> {
        ids.iter().map(|&i| self.convert(i, depth)).collect()
    }

    fn fill_mapping(
        &mut self,
        target: &Bound<'py, PyAny>,
        items: &[(ObjId, ObjId)],
        depth: usize,
    ) -> PyResult<()> {
        for &(k, v) in items {
            let key = self.convert(k, depth)?;
            let value = self.convert(v, depth)?;
            target
                .set_item(key, value)
                .map_err(|e| self.error(format!("bad dict key: {e}")))?;
        }
        Ok(())
    }
}

use pyo3::types::IntoPyDict;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyCheckpoint>()?;
    m.add_class::<DLPackView>()?;
    m.add_function(pyo3::wrap_pyfunction!(safetensors_dtype_name, m)?)?;
    Ok(())
}

/// The safetensors header name of a torch dtype name ("float32" -> "F32").
#[pyfunction]
pub fn safetensors_dtype_name(torch_name: &str) -> PyResult<&'static str> {
    crate::dtype::DType::from_torch_name(torch_name)
        .and_then(|d| d.safetensors_name())
        .ok_or_else(|| {
            pyo3::exceptions::PyValueError::new_err(format!(
                "dtype {torch_name:?} has no safetensors name"
            ))
        })
}
