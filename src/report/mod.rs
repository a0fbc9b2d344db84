//! Looking at a rollout: its trajectories as Jupyter notebooks ([`notebook`]) and one
//! self-contained HTML report over one run or two side by side ([`html`]), both read from a
//! rollout's folder ([`RunFiles`]).

pub mod html;
pub mod notebook;

use std::path::{Path, PathBuf};

use crate::rollout::Summary;
use crate::rollout::Trajectory;
use crate::rollout::runner::{SUMMARY_FILE, TRAJECTORIES_FILE};

/// Reading a rollout or writing what shows it failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file could not be read.
    #[error("failed to read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("failed to write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The rollout has no readable trajectory.
    #[error(
        "failed to find any trajectory in {path}: give a rollout's output folder (the --out of \
         `rollbox rollout`) or its trajectories.jsonl"
    )]
    Empty {
        /// The file read.
        path: PathBuf,
    },
    /// No trajectory has the id asked for.
    #[error("failed to find trajectory `{id}` in {path}; ids look like `<instance_id>/<sample>`, e.g. `{example}`")]
    UnknownId {
        /// The id asked for.
        id: String,
        /// The file read.
        path: PathBuf,
        /// An id that is there.
        example: String,
    },
}

/// A rollout as its folder holds it.
#[derive(Debug)]
pub struct RunFiles {
    /// Its name in a report: the folder's path as given.
    pub name: String,
    /// The trajectories, in file order.
    pub trajectories: Vec<Trajectory>,
    /// Lines of `trajectories.jsonl` that are not trajectories (a line cut off by a crash).
    pub unreadable_lines: usize,
    /// `summary.json`, when it is there and readable.
    pub summary: Option<Summary>,
}

impl RunFiles {
    /// Reads the rollout at `path`: its output folder, or its `trajectories.jsonl` (then
    /// `summary.json` is looked for beside it).
    pub fn load(path: &Path) -> Result<RunFiles, ReportError> {
        let (dir, file) = match path.is_dir() {
            true => (path.to_owned(), path.join(TRAJECTORIES_FILE)),
            false => (path.parent().unwrap_or(Path::new(".")).to_owned(), path.to_owned()),
        };
        let text = std::fs::read_to_string(&file).map_err(|source| ReportError::Read {
            path: file.clone(),
            source,
        })?;
        let mut trajectories = Vec::new();
        let mut unreadable_lines = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Trajectory>(line) {
                Ok(trajectory) => trajectories.push(trajectory),
                Err(_) => unreadable_lines += 1,
            }
        }
        if trajectories.is_empty() {
            return Err(ReportError::Empty { path: file });
        }
        let summary = std::fs::read_to_string(dir.join(SUMMARY_FILE))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok());
        Ok(RunFiles {
            name: path.display().to_string(),
            trajectories,
            unreadable_lines,
            summary,
        })
    }

    /// Writes the notebook of each trajectory (or only of `only`) into `dir`, named by
    /// [`notebook::file_name`]; returns the files written.
    pub fn write_notebooks(&self, dir: &Path, only: Option<&str>) -> Result<Vec<PathBuf>, ReportError> {
        let chosen: Vec<&Trajectory> = match only {
            Some(id) => {
                let found = self.trajectories.iter().find(|t| t.trajectory_id == id);
                vec![found.ok_or_else(|| ReportError::UnknownId {
                    id: id.to_owned(),
                    path: PathBuf::from(&self.name),
                    example: self.trajectories[0].trajectory_id.clone(),
                })?]
            }
            None => self.trajectories.iter().collect(),
        };
        std::fs::create_dir_all(dir).map_err(|source| ReportError::Write {
            path: dir.to_owned(),
            source,
        })?;
        let mut written = Vec::with_capacity(chosen.len());
        for trajectory in chosen {
            let path = dir.join(notebook::file_name(&trajectory.trajectory_id));
            let json = serde_json::to_string_pretty(&notebook::notebook(trajectory)).unwrap_or_default();
            std::fs::write(&path, json + "\n").map_err(|source| ReportError::Write {
                path: path.clone(),
                source,
            })?;
            written.push(path);
        }
        Ok(written)
    }
}
