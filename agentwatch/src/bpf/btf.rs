//! Field offsets of kernel structs from the running kernel's BTF (/sys/kernel/btf/vmlinux).
//!
//! The LSM programs read `struct file` and `struct linux_binprm`, whose layouts change between
//! kernels. aya-ebpf has no CO-RE relocations, so the daemon looks the offsets up here and
//! writes them into the object's read-only globals before loading it. aya-obj parses BTF but
//! keeps struct members private; this reads only what it needs: the type section's records
//! (to skip them) and struct/union members.

use std::path::Path;

use thiserror::Error;

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    #[error("BTF struct {0} has no member {1}")]
    NoMember(String, String),
}

/// One type record: kind, name, vlen, kind_flag, and where its trailing data starts.
#[derive(Clone, Copy)]
struct Type {
    kind: u32,
    name: u32,
    vlen: usize,
    kind_flag: bool,
    size_or_type: u32,
    data: usize,
}

/// The parsed type section of one BTF blob.
pub struct Btf {
    bytes: Vec<u8>,
    strings: usize,
    strings_len: usize,
    /// Index = type id (0 is void).
    types: Vec<Type>,
}

impl Btf {
    /// The running kernel's BTF.
    pub fn vmlinux() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let bytes = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(bytes)
    }

    pub fn parse(bytes: Vec<u8>) -> Result<Self, BtfError> {
        let u16_at = |at: usize| {
            bytes
                .get(at..at + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        if u16_at(0) != Some(MAGIC) {
            return Err(BtfError::Malformed("bad magic (or not little-endian)"));
        }
        let header = |i: usize| word(&bytes, 4 + 4 * i).ok_or(BtfError::Malformed("short header"));
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (header(0)?, header(1)?, header(2)?, header(3)?, header(4)?);
        let types_start = (hdr_len + type_off) as usize;
        let types_end = types_start + type_len as usize;
        let strings = (hdr_len + str_off) as usize;
        if types_end > bytes.len() || strings + str_len as usize > bytes.len() {
            return Err(BtfError::Malformed("sections past the end"));
        }
        let mut types = vec![Type {
            kind: 0,
            name: 0,
            vlen: 0,
            kind_flag: false,
            size_or_type: 0,
            data: 0,
        }];
        let mut at = types_start;
        while at < types_end {
            let (Some(name), Some(info), Some(size_or_type)) =
                (word(&bytes, at), word(&bytes, at + 4), word(&bytes, at + 8))
            else {
                return Err(BtfError::Malformed("truncated type"));
            };
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let data = at + 12;
            let extra = match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
                2 | 7..=12 | 16 | 18 => 0,    // PTR, FWD, TYPEDEF..FUNC, FLOAT, TYPE_TAG
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            types.push(Type {
                kind,
                name,
                vlen,
                kind_flag: info >> 31 != 0,
                size_or_type,
                data,
            });
            at = data + extra;
        }
        Ok(Self {
            bytes,
            strings,
            strings_len: str_len as usize,
            types,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let start = self.strings + off as usize;
        let end = self.strings + self.strings_len;
        let tail = self.bytes.get(start..end).unwrap_or_default();
        let len = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        &tail[..len]
    }

    /// Byte offset of `member` in `struct name`, looking into anonymous struct/union members.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = self
            .types
            .iter()
            .position(|t| t.kind == KIND_STRUCT && self.name(t.name) == name.as_bytes())
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))?;
        self.find_member(id, member, 0, 0)
            .ok_or_else(|| BtfError::NoMember(name.to_owned(), member.to_owned()))
    }

    fn find_member(&self, id: usize, member: &str, base_bits: u32, depth: u32) -> Option<u32> {
        let t = *self.types.get(id)?;
        if depth > 8 || !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        let mut anonymous = Vec::new();
        for i in 0..t.vlen {
            let at = t.data + 12 * i;
            let (name, ty, offset) = (
                word(&self.bytes, at)?,
                word(&self.bytes, at + 4)?,
                word(&self.bytes, at + 8)?,
            );
            // With kind_flag the top 8 bits are a bitfield's size.
            let bits = base_bits
                + if t.kind_flag {
                    offset & 0xff_ffff
                } else {
                    offset
                };
            let member_name = self.name(name);
            if member_name == member.as_bytes() {
                return bits.is_multiple_of(8).then_some(bits / 8);
            }
            if member_name.is_empty() {
                anonymous.push((self.resolve(ty)?, bits));
            }
        }
        anonymous
            .into_iter()
            .find_map(|(ty, bits)| self.find_member(ty, member, bits, depth + 1))
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<usize> {
        for _ in 0..16 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type;
                }
                _ => return Some(id as usize),
            }
        }
        None
    }
}

fn word(bytes: &[u8], at: usize) -> Option<u32> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's BTF (every kernel this project supports has it): offsets that
    /// pahole-style layouts fix (`struct file`'s `f_path` is 16 bytes, and `f_mode` is 4).
    #[test]
    fn finds_struct_members_in_the_running_kernels_btf() {
        let btf = Btf::vmlinux().expect("vmlinux BTF");
        let f_path = btf.member_offset("file", "f_path").expect("f_path");
        let f_mode = btf.member_offset("file", "f_mode").expect("f_mode");
        let f_inode = btf.member_offset("file", "f_inode").expect("f_inode");
        assert!(f_path > 0 && f_path.is_multiple_of(8), "f_path at {f_path}");
        assert_ne!(f_path, f_mode);
        assert_ne!(f_path, f_inode);
        // struct path is { vfsmount *mnt; dentry *dentry; }: dentry 8 bytes in.
        assert_eq!(btf.member_offset("path", "dentry").expect("dentry"), 8);
        assert_eq!(btf.member_offset("path", "mnt").expect("mnt"), 0);
        let filename = btf
            .member_offset("linux_binprm", "filename")
            .expect("filename");
        assert!(filename > 0);
        assert!(matches!(
            btf.member_offset("file", "no_such_member"),
            Err(BtfError::NoMember(..))
        ));
        assert!(matches!(
            btf.member_offset("no_such_struct_here", "x"),
            Err(BtfError::NoStruct(..))
        ));
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(matches!(
            Btf::parse(b"not btf at all".to_vec()),
            Err(BtfError::Malformed(_))
        ));
        let mut short = vec![0x9f, 0xeb, 1, 0];
        short.extend_from_slice(&[24, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0]);
        assert!(matches!(Btf::parse(short), Err(BtfError::Malformed(_))));
    }
}
