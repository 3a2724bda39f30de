//! Reading and writing .npy tensors, with errors that name the flag.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, Ix4, IxDyn};
use ndarray_npy::{ReadNpyError, ReadNpyExt, WriteNpyExt};

use crate::CliError;

fn describe(e: &ReadNpyError, expected: &str, convert: &str) -> String {
    match e {
        ReadNpyError::Io(io) => format!("cannot read the file: {io}"),
        ReadNpyError::WrongDescriptor(d) => {
            format!(
                "expected {expected}, but the file holds dtype {d}; convert it first (numpy: np.save(path, a.{convert}))"
            )
        }
        other => format!("not a valid {expected} .npy file: {other}"),
    }
}

fn open(flag: &str, path: &Path) -> Result<File, CliError> {
    File::open(path)
        .map_err(|e| CliError::input(flag, format!("cannot open {}: {e}", path.display())))
}

/// A float32 tensor of any rank.
pub fn read_f32(flag: &str, path: &Path) -> Result<ArrayD<f32>, CliError> {
    ArrayD::<f32>::read_npy(open(flag, path)?).map_err(|e| {
        CliError::input(
            flag,
            format!(
                "{}: {}",
                path.display(),
                describe(&e, "float32 ('<f4')", "astype(np.float32)")
            ),
        )
    })
}

/// A boolean tensor of any rank.
pub fn read_bool(flag: &str, path: &Path) -> Result<ArrayD<bool>, CliError> {
    ArrayD::<bool>::read_npy(open(flag, path)?).map_err(|e| {
        CliError::input(
            flag,
            format!("{}: {}", path.display(), describe(&e, "bool ('|b1')", "astype(bool)")),
        )
    })
}

/// A float32 tensor that must be `[batch, heads, seq, head_dim]`.
pub fn read_bhnd(flag: &str, path: &Path) -> Result<ndarray::Array4<f32>, CliError> {
    let a = read_f32(flag, path)?;
    let shape = a.shape().to_vec();
    a.into_dimensionality::<Ix4>().map_err(|_| {
        CliError::input(
            flag,
            format!(
                "{} has shape {shape:?}; it must be 4-D [batch, heads, seq, head_dim]",
                path.display()
            ),
        )
    })
}

/// Prepends axes of length 1 up to rank 4 (numpy broadcasting).
pub fn to_rank4<A>(flag: &str, a: ArrayD<A>, what: &str) -> Result<ndarray::Array4<A>, CliError> {
    let shape = a.shape().to_vec();
    if shape.len() > 4 {
        return Err(CliError::input(flag, format!("has shape {shape:?}; {what}")));
    }
    let mut full = vec![1; 4 - shape.len()];
    full.extend(&shape);
    a.into_shape_with_order(IxDyn(&full))
        .and_then(|a| a.into_dimensionality::<Ix4>())
        .map_err(|_| CliError::input(flag, format!("has shape {shape:?}; {what}")))
}

/// Output files written all at once: each goes to a temporary sibling first (created up
/// front, so a bad path fails before any work), and is renamed into place only when every
/// result has been written. On any failure the temporaries are removed.
pub struct Outputs {
    files: Vec<(&'static str, PathBuf, PathBuf)>,
    committed: bool,
}

impl Outputs {
    pub fn new() -> Self {
        Self { files: Vec::new(), committed: false }
    }

    /// Reserves `path` for the output of `flag`.
    pub fn reserve(&mut self, flag: &'static str, path: &Path) -> Result<(), CliError> {
        let name = path.file_name().ok_or_else(|| {
            CliError::input(flag, format!("{} is not a file path", path.display()))
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".attn-{}.tmp", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        File::create(&tmp)
            .map_err(|e| CliError::input(flag, format!("cannot create {}: {e}", path.display())))?;
        self.files.push((flag, path.to_path_buf(), tmp));
        Ok(())
    }

    /// Writes `array` to the temporary file of `flag`.
    pub fn write<T: WriteNpyExt + ?Sized>(&self, flag: &str, array: &T) -> Result<(), CliError> {
        let (_, path, tmp) =
            self.files.iter().find(|(f, _, _)| *f == flag).expect("output reserved before writing");
        let file = File::create(tmp).map_err(|e| write_error(flag, path, e))?;
        array.write_npy(BufWriter::new(file)).map_err(|e| write_error(flag, path, e))
    }

    /// Moves every temporary file into place.
    pub fn commit(mut self) -> Result<Vec<PathBuf>, CliError> {
        for (flag, path, tmp) in &self.files {
            std::fs::rename(tmp, path).map_err(|e| write_error(flag, path, e))?;
        }
        self.committed = true;
        Ok(self.files.iter().map(|(_, p, _)| p.clone()).collect())
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        if !self.committed {
            for (_, _, tmp) in &self.files {
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
}

fn write_error(flag: &str, path: &Path, e: impl std::fmt::Display) -> CliError {
    CliError { code: 1, message: format!("{flag}: cannot write {}: {e}", path.display()) }
}

/// An integer tensor (int64 or int32) of any rank, as i64.
pub fn read_int(flag: &str, path: &Path) -> Result<ArrayD<i64>, CliError> {
    match ArrayD::<i64>::read_npy(open(flag, path)?) {
        Ok(a) => Ok(a),
        Err(ReadNpyError::WrongDescriptor(_)) => {
            ArrayD::<i32>::read_npy(open(flag, path)?).map(|a| a.mapv(i64::from)).map_err(|e| {
                CliError::input(
                    flag,
                    format!(
                        "{}: {}",
                        path.display(),
                        describe(&e, "int64 ('<i8') or int32 ('<i4')", "astype(np.int64)")
                    ),
                )
            })
        }
        Err(e) => Err(CliError::input(
            flag,
            format!(
                "{}: {}",
                path.display(),
                describe(&e, "int64 ('<i8') or int32", "astype(np.int64)")
            ),
        )),
    }
}

/// A 1-D integer tensor.
pub fn read_int_vec(flag: &str, path: &Path, what: &str) -> Result<Vec<i64>, CliError> {
    let a = read_int(flag, path)?;
    if a.ndim() != 1 {
        return Err(CliError::input(
            flag,
            format!("{} has shape {:?}; {what}", path.display(), a.shape()),
        ));
    }
    Ok(a.iter().copied().collect())
}
