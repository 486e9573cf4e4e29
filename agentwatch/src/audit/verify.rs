//! `agentwatch audit verify`: checks a trail's hash chain, with no daemon and no privileges.
//!
//! The files are read in the order given, oldest first (`audit.jsonl.3 audit.jsonl.2
//! audit.jsonl.1 audit.jsonl`), as one sequence of lines: every line must be a JSON object
//! whose `prev` is the SHA-256 of the line before it, across files. The first line given may
//! chain to a line that is not there (rotated away by `audit_keep`, or older files not given):
//! that is said, not an error. Anything else is a break, reported with its file and line and
//! what it means; the reading goes on after it, so the report also says whether the chain is
//! intact beyond it.

use std::{
    fmt,
    fs::File,
    io::{self, BufRead as _, BufReader},
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::chain::{self, START};

/// A line of the trail: the file as given and the line's number in it (from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: u64,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Why the chain breaks at a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The last line of a file has no newline at its end.
    Incomplete,
    /// The line does not parse as JSON (the parser's message).
    NotJson(String),
    NotObject,
    NoPrev,
    PrevNotString,
    /// `prev` is the link of the line two before: the line before this one was inserted.
    Inserted {
        line: Location,
    },
    /// `prev` is the empty string's hash in the middle of the trail.
    NewChain,
    /// `prev` is not the link of the line before it, in the same file.
    Changed {
        before: Location,
    },
    /// The first line of a file does not chain to the last line of the file given before it.
    FileBoundary {
        after: PathBuf,
        /// `prev` is the empty string's hash: the file starts a trail of its own.
        new_chain: bool,
        /// The order in which the files do chain, when there is one and it is not the one given.
        order: Option<Vec<PathBuf>>,
        /// The order their names give (`X.3 X.2 X.1 X`) when that is not the one given.
        by_name: Option<Vec<PathBuf>>,
    },
}

/// The first break and what comes after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    pub at: Location,
    pub problem: Problem,
    /// Breaks further on, and where the next one is.
    pub more: u64,
    pub next: Option<Location>,
    /// Lines read after the broken one.
    pub lines_after: u64,
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub lines: u64,
    pub files: usize,
    /// The first line given chains to a line that is not among the files (not an error).
    pub mid_chain: Option<Location>,
    /// The link of the last line: the `prev` the trail's next line will carry.
    pub last: Option<String>,
    pub broken: Option<Break>,
}

impl Report {
    pub fn intact(&self) -> bool {
        self.broken.is_none()
    }
}

/// A file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading {}", path.display())]
pub struct ReadError {
    pub path: PathBuf,
    pub source: io::Error,
}

/// What verification keeps of a file, to tell files given out of order.
struct FileEnds {
    path: PathBuf,
    /// The `prev` its first line claims.
    first_prev: Option<String>,
    /// The link of its last line; None for an empty file.
    last_link: Option<String>,
}

/// Checks the trail made of `paths`, oldest first.
pub fn verify(paths: &[PathBuf]) -> Result<Report, ReadError> {
    let mut walk = Walk::default();
    for (i, path) in paths.iter().enumerate() {
        let err = |source| ReadError {
            path: path.clone(),
            source,
        };
        let mut reader = BufReader::new(File::open(path).map_err(err)?);
        let mut ends = FileEnds {
            path: path.clone(),
            first_prev: None,
            last_link: None,
        };
        let mut buf = Vec::new();
        let mut n = 0u64;
        loop {
            buf.clear();
            if reader.read_until(b'\n', &mut buf).map_err(err)? == 0 {
                break;
            }
            n += 1;
            let complete = buf.last() == Some(&b'\n');
            let line = if complete {
                &buf[..buf.len() - 1]
            } else {
                &buf[..]
            };
            let at = Location {
                file: path.clone(),
                line: n,
            };
            let claimed = walk.line(at, line, complete, i > 0 && n == 1);
            if n == 1 {
                ends.first_prev = claimed;
            }
        }
        ends.last_link = (n > 0).then(|| walk.prev.clone()).flatten();
        walk.ends.push(ends);
    }
    Ok(walk.report(paths))
}

#[derive(Default)]
struct Walk {
    lines: u64,
    /// The link of the last line read.
    prev: Option<String>,
    prev_at: Option<Location>,
    /// The link of the line before that (for the first line: what it claims to follow).
    prev2: Option<String>,
    mid_chain: Option<Location>,
    first: Option<(Location, Problem, u64)>,
    more: u64,
    next: Option<Location>,
    ends: Vec<FileEnds>,
}

impl Walk {
    /// Checks one line; returns the `prev` it claims.
    fn line(
        &mut self,
        at: Location,
        line: &[u8],
        complete: bool,
        starts_file: bool,
    ) -> Option<String> {
        self.lines += 1;
        let (claimed, problem) = match serde_json::from_slice::<Value>(line) {
            Err(e) => (None, Some(Problem::NotJson(e.to_string()))),
            Ok(Value::Object(o)) => match o.get("prev") {
                None => (None, Some(Problem::NoPrev)),
                Some(Value::String(p)) => (Some(p.clone()), None),
                Some(_) => (None, Some(Problem::PrevNotString)),
            },
            Ok(_) => (None, Some(Problem::NotObject)),
        };
        // A cut-short line says so first: it explains whatever else is wrong with it.
        let problem = if complete {
            problem
        } else {
            Some(Problem::Incomplete)
        };
        let problem = problem.or_else(|| {
            let claimed = claimed.as_deref()?;
            let Some(prev) = &self.prev else {
                if claimed != START {
                    self.mid_chain = Some(at.clone());
                }
                return None;
            };
            if claimed == prev {
                return None;
            }
            Some(if self.prev2.as_deref() == Some(claimed) {
                Problem::Inserted {
                    line: self.prev_at.clone()?,
                }
            } else if starts_file {
                Problem::FileBoundary {
                    after: self.prev_at.as_ref()?.file.clone(),
                    new_chain: claimed == START,
                    order: None,
                    by_name: None,
                }
            } else if claimed == START {
                Problem::NewChain
            } else {
                Problem::Changed {
                    before: self.prev_at.clone()?,
                }
            })
        });
        if let Some(problem) = problem {
            match &self.first {
                None => self.first = Some((at.clone(), problem, self.lines)),
                Some(_) => {
                    self.more += 1;
                    self.next.get_or_insert_with(|| at.clone());
                }
            }
        }
        let link = chain::link(line);
        self.prev2 = match self.prev.take() {
            Some(p) => Some(p),
            // The first line: what it claims to follow (a line inserted before it shows so).
            None => Some(claimed.clone().unwrap_or_else(|| START.to_owned())),
        };
        self.prev = Some(link);
        self.prev_at = Some(at);
        claimed
    }

    fn report(self, paths: &[PathBuf]) -> Report {
        let broken = self.first.map(|(at, problem, index)| {
            let problem = match problem {
                Problem::FileBoundary {
                    after, new_chain, ..
                } => {
                    let order = chain_order(&self.ends);
                    Problem::FileBoundary {
                        after,
                        new_chain,
                        by_name: if order.is_some() {
                            None
                        } else {
                            name_order(paths)
                        },
                        order,
                    }
                }
                p => p,
            };
            Break {
                at,
                problem,
                more: self.more,
                next: self.next,
                lines_after: self.lines - index,
            }
        });
        Report {
            lines: self.lines,
            files: paths.len(),
            mid_chain: self.mid_chain,
            last: self.prev,
            broken,
        }
    }
}

/// The order in which the files chain end to start, if there is exactly one covering every
/// file with lines and it is not the order given. Empty files go last (they chain to nothing).
fn chain_order(ends: &[FileEnds]) -> Option<Vec<PathBuf>> {
    let full: Vec<usize> = (0..ends.len())
        .filter(|&i| ends[i].last_link.is_some())
        .collect();
    let follows = |a: usize, b: usize| a != b && ends[a].last_link == ends[b].first_prev;
    // The first file is the one that follows no other given file.
    let mut starts = full
        .iter()
        .copied()
        .filter(|&f| !full.iter().any(|&g| follows(g, f)));
    let mut order = vec![starts.next()?];
    if starts.next().is_some() {
        return None;
    }
    while order.len() < full.len() {
        let last = order[order.len() - 1];
        let next = full
            .iter()
            .copied()
            .find(|&f| !order.contains(&f) && follows(last, f))?;
        order.push(next);
    }
    order.extend((0..ends.len()).filter(|&i| ends[i].last_link.is_none()));
    let given: Vec<usize> = (0..ends.len()).collect();
    (order != given).then(|| order.into_iter().map(|i| ends[i].path.clone()).collect())
}

/// The order rotated names give, oldest first (`X.3 X.2 X.1 X`), when every path is `X` or
/// `X.N` of one `X` and that order is not the one given.
fn name_order(paths: &[PathBuf]) -> Option<Vec<PathBuf>> {
    let split = |p: &Path| -> (PathBuf, Option<u32>) {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        match name.as_deref().and_then(|n| n.rsplit_once('.')) {
            Some((stem, n)) if n.parse::<u32>().is_ok() => {
                (p.with_file_name(stem), n.parse::<u32>().ok())
            }
            _ => (p.to_owned(), None),
        }
    };
    let keyed: Vec<(PathBuf, Option<u32>, &PathBuf)> = paths
        .iter()
        .map(|p| {
            let (stem, n) = split(p);
            (stem, n, p)
        })
        .collect();
    let stem = &keyed.first()?.0;
    if keyed.iter().any(|(s, _, _)| s != stem) {
        return None;
    }
    let mut sorted = keyed.clone();
    // The live file (no number) is the newest; the highest number the oldest.
    sorted.sort_by_key(|(_, n, _)| std::cmp::Reverse(n.map_or(0, |n| u64::from(n) + 1)));
    let sorted: Vec<PathBuf> = sorted.into_iter().map(|(_, _, p)| p.clone()).collect();
    (sorted != paths).then_some(sorted)
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn paths_list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Incomplete => write!(
                f,
                "incomplete line (no newline at its end): a write cut short by a crash or a \
                 full disk (a restarted daemon chains its next line to it as it is), or a line \
                 being written right now"
            ),
            Self::NotJson(e) => write!(
                f,
                "not JSON ({e}): a line cut short or garbled by a crash or a full disk, or edited"
            ),
            Self::NotObject => write!(f, "not a JSON object: not an audit line"),
            Self::NoPrev => write!(
                f,
                "no `prev`: not written by agentwatch's writer (inserted), or written before \
                 the trail had a hash chain"
            ),
            Self::PrevNotString => {
                write!(
                    f,
                    "`prev` is not a string: not written by agentwatch's writer"
                )
            }
            Self::Inserted { line } => write!(
                f,
                "its `prev` is the SHA-256 of the line before {line}, not of {line}: {line} \
                 was inserted"
            ),
            Self::NewChain => write!(
                f,
                "starts a new chain (its `prev` is the SHA-256 of the empty string): the lines \
                 before it were removed, or a new trail began here (a daemon writing to stdout \
                 starts one at every start)"
            ),
            Self::Changed { before } => write!(
                f,
                "its `prev` is not the SHA-256 of the line before it ({before}): that line was \
                 changed, or lines were removed or inserted here"
            ),
            Self::FileBoundary {
                after,
                new_chain,
                order,
                by_name,
            } => {
                write!(
                    f,
                    "its `prev` is not the SHA-256 of the last line of {}: ",
                    after.display()
                )?;
                if let Some(order) = order {
                    return write!(
                        f,
                        "the files are not in order (oldest first); they chain in this order: {}",
                        paths_list(order)
                    );
                }
                if *new_chain {
                    write!(
                        f,
                        "this file starts a trail of its own (its first `prev` is the SHA-256 \
                         of the empty string)"
                    )?;
                } else {
                    write!(
                        f,
                        "a file between them is missing, lines were removed at the boundary, \
                         or that last line was changed"
                    )?;
                }
                if let Some(names) = by_name {
                    write!(f, "; rotated files go oldest first: {}", paths_list(names))?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.broken {
            None => {
                write!(
                    f,
                    "ok: {} in {}, chain intact",
                    plural(self.lines, "line", "lines"),
                    plural(self.files as u64, "file", "files")
                )?;
                if let Some(at) = &self.mid_chain {
                    write!(
                        f,
                        "; starts mid-chain: the line before {at} is not among the files given \
                         (rotated away by audit_keep, or older files not given)"
                    )?;
                }
                writeln!(f)?;
                if let Some(last) = &self.last {
                    // Kept somewhere else, it shows a chain rewritten from an earlier line on.
                    writeln!(f, "last line's SHA-256 (the next line's prev): {last}")?;
                }
                Ok(())
            }
            Some(b) => {
                writeln!(f, "{}: {}", b.at, b.problem)?;
                match &b.next {
                    Some(next) => writeln!(
                        f,
                        "{} after it, the next at {next}",
                        plural(b.more, "more break", "more breaks")
                    ),
                    None if b.lines_after > 0 => writeln!(
                        f,
                        "the chain is intact after it ({})",
                        plural(b.lines_after, "more line", "more lines")
                    ),
                    None => Ok(()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Audit, Rotation, rotated};
    use serde_json::json;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("aw-verify-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A trail of `n` records at `dir/a.jsonl`, rotated at 2000 bytes (about 11 lines a file).
    fn trail(dir: &Path, n: u64) -> Vec<PathBuf> {
        let path = dir.join("a.jsonl");
        let audit = Audit::open_rotating(
            &path,
            Some(Rotation {
                max_size: 2000,
                keep: 10,
            }),
        )
        .unwrap();
        for i in 0..n {
            audit.record(
                "a",
                "egress_denied",
                json!({ "n": i, "dest": "10.0.0.1:443" }),
            );
        }
        audit.sync();
        let mut files: Vec<PathBuf> = (1..=10)
            .rev()
            .map(|k| rotated(&path, k))
            .filter(|p| p.exists())
            .collect();
        files.push(path);
        files
    }

    fn lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(p: &Path, lines: &[String]) {
        std::fs::write(p, lines.join("\n") + "\n").unwrap();
    }

    fn at(p: &Path, line: u64) -> Location {
        Location {
            file: p.to_owned(),
            line,
        }
    }

    #[test]
    fn an_untouched_rotated_trail_is_intact_from_its_start() {
        let dir = scratch("intact");
        let files = trail(&dir, 40);
        assert!(files.len() >= 4, "{files:?}");
        let r = verify(&files).unwrap();
        assert_eq!(r.broken, None, "{r}");
        assert_eq!(
            (r.lines, r.files, r.mid_chain.clone()),
            (40, files.len(), None)
        );
        assert_eq!(
            r.to_string().lines().next(),
            Some(format!("ok: 40 lines in {} files, chain intact", files.len()).as_str())
        );
        // Only the newest files: intact, and it says the start is elsewhere.
        let newest = &files[files.len() - 2..];
        let r = verify(newest).unwrap();
        assert!(r.intact(), "{r}");
        assert_eq!(r.mid_chain, Some(at(&newest[0], 1)));
        assert!(
            r.to_string().contains(&format!(
                "chain intact; starts mid-chain: the line before {}:1 is not among the files given",
                newest[0].display()
            )),
            "{r}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_changed_byte_breaks_the_chain_at_the_next_line() {
        let dir = scratch("changed");
        let files = trail(&dir, 40);
        let f = &files[1];
        let mut l = lines(f);
        l[2] = l[2].replacen("10.0.0.1", "10.0.0.2", 1);
        write_lines(f, &l);
        let r = verify(&files).unwrap();
        let b = r.broken.clone().unwrap();
        assert_eq!(b.at, at(f, 4));
        assert_eq!(b.problem, Problem::Changed { before: at(f, 3) });
        assert_eq!((b.more, b.next), (0, None));
        let text = r.to_string();
        assert!(
            text.starts_with(&format!(
                "{}:4: its `prev` is not the SHA-256 of the line before it ({}:3): that line was changed",
                f.display(),
                f.display()
            )),
            "{text}"
        );
        assert!(text.contains("the chain is intact after it"), "{text}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_removed_line_breaks_the_chain_where_it_was() {
        let dir = scratch("removed");
        let files = trail(&dir, 40);
        let f = &files[2];
        let mut l = lines(f);
        l.remove(3);
        write_lines(f, &l);
        let b = verify(&files).unwrap().broken.unwrap();
        assert_eq!(b.at, at(f, 4));
        assert_eq!(b.problem, Problem::Changed { before: at(f, 3) });
        // The last line of a file removed: the break is at the next file's first line.
        let files = trail(&scratch("removed-last"), 40);
        let f = &files[1];
        let mut l = lines(f);
        l.pop();
        write_lines(f, &l);
        let b = verify(&files).unwrap().broken.unwrap();
        assert_eq!(b.at, at(&files[2], 1));
        assert!(
            matches!(&b.problem, Problem::FileBoundary { after, order: None, .. } if after == f),
            "{:?}",
            b.problem
        );
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::remove_dir_all(scratch("removed-last")).unwrap();
    }

    #[test]
    fn an_inserted_line_is_named() {
        let dir = scratch("inserted");
        let files = trail(&dir, 40);
        let f = &files[1];
        let l = lines(f);
        // Forged with the right `prev`: the line after it no longer chains, and names it.
        let forged = format!(
            r#"{{"ts":"2026-01-01T00:00:00.000000Z","agent":"a","kind":"approved","prev":"{}"}}"#,
            chain::link(l[1].as_bytes())
        );
        let mut tampered = l.clone();
        tampered.insert(2, forged);
        write_lines(f, &tampered);
        let b = verify(&files).unwrap().broken.unwrap();
        assert_eq!(b.at, at(f, 4));
        assert_eq!(b.problem, Problem::Inserted { line: at(f, 3) });
        // A copy of another line: it breaks where it stands, and names itself at the next.
        let mut tampered = l.clone();
        tampered.insert(5, l[0].clone());
        write_lines(f, &tampered);
        let b = verify(&files).unwrap().broken.unwrap();
        assert_eq!(b.at, at(f, 6));
        assert_eq!(b.problem, Problem::Changed { before: at(f, 5) });
        assert_eq!(b.next, Some(at(f, 7)));
        // No `prev` at all.
        let mut tampered = l;
        tampered.insert(1, r#"{"ts":"x","agent":"a","kind":"thawed"}"#.to_owned());
        write_lines(f, &tampered);
        let b = verify(&files).unwrap().broken.unwrap();
        assert_eq!((b.at, b.problem), (at(f, 2), Problem::NoPrev));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn files_out_of_order_are_named_with_the_order_that_chains() {
        let dir = scratch("order");
        let files = trail(&dir, 40);
        let newest_first: Vec<PathBuf> = files.iter().rev().cloned().collect();
        let r = verify(&newest_first).unwrap();
        let b = r.broken.clone().unwrap();
        assert_eq!(b.at, at(&newest_first[1], 1));
        assert_eq!(
            b.problem,
            Problem::FileBoundary {
                after: newest_first[0].clone(),
                new_chain: false,
                order: Some(files.clone()),
                by_name: None,
            }
        );
        assert!(
            r.to_string()
                .contains(&format!("they chain in this order: {}", paths_list(&files))),
            "{r}"
        );
        // Two neighbours swapped.
        let mut swapped = files.clone();
        swapped.swap(1, 2);
        let b = verify(&swapped).unwrap().broken.unwrap();
        assert_eq!(b.at, at(&swapped[1], 1));
        assert!(
            matches!(&b.problem, Problem::FileBoundary { order: Some(o), .. } if *o == files),
            "{:?}",
            b.problem
        );
        // A file missing in between: no order chains, the names tell none either.
        let mut missing = files.clone();
        missing.remove(1);
        let b = verify(&missing).unwrap().broken.unwrap();
        assert_eq!(b.at, at(&missing[1], 1));
        assert!(
            matches!(
                &b.problem,
                Problem::FileBoundary {
                    order: None,
                    by_name: None,
                    new_chain: false,
                    ..
                }
            ),
            "{:?}",
            b.problem
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn rotated_names_suggest_an_order_when_the_chain_cannot() {
        let names: Vec<PathBuf> = ["a.jsonl.1", "a.jsonl", "a.jsonl.3"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(
            name_order(&names),
            Some(vec![
                "a.jsonl.3".into(),
                "a.jsonl.1".into(),
                "a.jsonl".into()
            ])
        );
        let sorted: Vec<PathBuf> = ["a.jsonl.2", "a.jsonl.1", "a.jsonl"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(name_order(&sorted), None);
        let mixed: Vec<PathBuf> = ["a.jsonl.1", "b.jsonl"].iter().map(PathBuf::from).collect();
        assert_eq!(name_order(&mixed), None);
    }

    #[test]
    fn an_incomplete_last_line_is_named_and_a_restarted_writer_chains_past_it() {
        let dir = scratch("torn");
        let path = dir.join("a.jsonl");
        let audit = Audit::open(&path).unwrap();
        for i in 0..3 {
            audit.record("a", "egress_denied", json!({ "n": i }));
        }
        audit.sync();
        drop(audit);
        // A crash in the middle of the fourth line.
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(br#"{"ts":"2026-01-01T00:00:00.0"#);
        std::fs::write(&path, &text).unwrap();
        let files = vec![path.clone()];
        let b = verify(&files).unwrap().broken.unwrap();
        assert_eq!((b.at, b.problem), (at(&path, 4), Problem::Incomplete));

        let audit = Audit::open(&path).unwrap();
        audit.record("a", "egress_denied", json!({ "n": 3 }));
        audit.record("a", "egress_denied", json!({ "n": 4 }));
        audit.sync();
        let l = lines(&path);
        assert_eq!(l.len(), 6, "{l:?}");
        assert_eq!(l[3], r#"{"ts":"2026-01-01T00:00:00.0"#, "left as it was");
        let fifth: Value = serde_json::from_str(&l[4]).unwrap();
        assert_eq!(fifth["prev"], chain::link(l[3].as_bytes()));
        let r = verify(&files).unwrap();
        let b = r.broken.clone().unwrap();
        assert_eq!(b.at, at(&path, 4));
        assert!(matches!(b.problem, Problem::NotJson(_)), "{:?}", b.problem);
        assert_eq!((b.more, b.lines_after), (0, 2));
        let text = r.to_string();
        assert!(
            text.starts_with(&format!("{}:4: not JSON (", path.display())),
            "{text}"
        );
        assert!(
            text.ends_with("the chain is intact after it (2 more lines)\n"),
            "{text}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_line_that_restarts_the_chain_and_a_line_inserted_first_are_named() {
        let dir = scratch("restart");
        let files = trail(&dir, 40);
        let f = &files[1];
        let mut l = lines(f);
        let mut v: Value = serde_json::from_str(&l[3]).unwrap();
        v["prev"] = json!(START);
        l[3] = serde_json::to_string(&v).unwrap();
        write_lines(f, &l);
        let b = verify(&files).unwrap().broken.unwrap();
        assert_eq!((b.at, b.problem), (at(f, 4), Problem::NewChain));

        let files = trail(&scratch("first"), 5);
        let f = &files[0];
        let mut l = lines(f);
        l.insert(0, format!(r#"{{"kind":"forged","prev":"{START}"}}"#));
        write_lines(f, &l);
        let b = verify(&files).unwrap().broken.unwrap();
        assert_eq!(
            (b.at, b.problem),
            (at(f, 2), Problem::Inserted { line: at(f, 1) })
        );
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::remove_dir_all(scratch("first")).unwrap();
    }

    #[test]
    fn a_file_that_cannot_be_read_is_an_error_naming_it() {
        let dir = scratch("missing");
        let p = dir.join("nope.jsonl");
        let e = verify(std::slice::from_ref(&p)).unwrap_err();
        assert_eq!(e.to_string(), format!("reading {}", p.display()));
        assert_eq!(e.source.kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
