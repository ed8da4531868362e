//! The containers' seccomp filter (invariant 9): Docker's default profile, an
//! allowlist, read from `worker/seccomp/docker-default.json` (a verbatim copy of
//! Moby's `profiles/seccomp/default.json`; its README names the commit and the
//! licence) and translated at run time into the OCI spec's `linux.seccomp`.
//!
//! The translation follows Moby's (`profiles/seccomp/seccomp_linux.go`): the
//! default action and errno, the architectures of the host's `archMap` entry,
//! and each syscall entry kept or dropped by its `includes`/`excludes` against
//! the host's architecture, its kernel version (`minKernel`) and the task's
//! capabilities — none for swarmd's tasks, so every entry that needs a
//! capability is left out and every entry excluded by one is kept. What stays:
//! everything else refused with EPERM, `clone` only without `CLONE_NEW*` flags,
//! `clone3` answered with ENOSYS (libc then falls back to `clone`, which can be
//! filtered), no `mount`, `unshare`, `setns`, `bpf`, module loading, keyrings…
//!
//! Then [`swarmd_amendments`] makes it stricter: no `io_uring_*` (as Moby did
//! after the copied commit) and, beyond Docker, no netfilter netlink socket and
//! no `ptrace`/`process_vm_readv`/`process_vm_writev` (Docker allows them from
//! kernel 4.8 on; swarmd always refused them).

use oci_spec::runtime::{Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompOperator, LinuxSyscall};
use serde::Deserialize;

/// Docker's default profile, as copied (see `worker/seccomp/README.md`).
pub const DOCKER_DEFAULT_PROFILE: &str = include_str!("../seccomp/docker-default.json");

/// Why a profile could not be translated.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The profile is not valid JSON of the expected shape.
    #[error("seccomp profile: {0}")]
    Parse(#[from] serde_json::Error),
    /// A `minKernel` that is not `MAJOR.MINOR`.
    #[error("seccomp profile: bad minKernel {0:?}")]
    MinKernel(String),
    /// The host's architecture has no entry in the profile's `archMap`.
    #[error("seccomp profile: no archMap entry for this host's architecture ({0})")]
    UnknownArch(String),
    /// The OCI builder refused a value.
    #[error("seccomp profile: {0}")]
    Spec(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Profile {
    default_action: LinuxSeccompAction,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    arch_map: Vec<ArchMapEntry>,
    syscalls: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArchMapEntry {
    architecture: Arch,
    #[serde(default)]
    sub_architectures: Option<Vec<Arch>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    names: Vec<String>,
    action: LinuxSeccompAction,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Option<Vec<Arg>>,
    #[serde(default)]
    includes: Filter,
    #[serde(default)]
    excludes: Filter,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Filter {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    #[serde(default)]
    min_kernel: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Arg {
    index: usize,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: LinuxSeccompOperator,
}

/// What a profile's conditions are matched against.
#[derive(Clone, Debug)]
pub struct Host {
    /// The architecture in Docker's (libseccomp's) spelling: `amd64`, `arm64`, `x86`…
    pub arch: String,
    /// Kernel version, major and minor.
    pub kernel: (u32, u32),
    /// The task's capabilities (`CAP_…`); swarmd's tasks have none.
    pub caps: Vec<String>,
}

impl Host {
    /// This machine, for a task without capabilities.
    pub fn current() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "x86" => "x86",
            "aarch64" => "arm64",
            "arm" => "arm",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "powerpc64" => "ppc64",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            "mips64" if cfg!(target_endian = "little") => "mipsel64",
            "mips64" => "mips64",
            other => other,
        };
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        Self { arch: arch.to_owned(), kernel: parse_kernel(&release).unwrap_or((0, 0)), caps: Vec::new() }
    }
}

/// `MAJOR.MINOR[.anything]` → (major, minor).
fn parse_kernel(s: &str) -> Option<(u32, u32)> {
    let mut parts = s.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

/// The libseccomp architecture of a Docker arch name (for `archMap`).
fn native_arch(arch: &str) -> Option<Arch> {
    Some(match arch {
        "amd64" => Arch::ScmpArchX86_64,
        "x86" => Arch::ScmpArchX86,
        "arm64" => Arch::ScmpArchAarch64,
        "arm" => Arch::ScmpArchArm,
        "ppc64le" => Arch::ScmpArchPpc64le,
        "ppc64" => Arch::ScmpArchPpc64,
        "s390x" => Arch::ScmpArchS390x,
        "riscv64" => Arch::ScmpArchRiscv64,
        "mips64" => Arch::ScmpArchMips64,
        "mipsel64" => Arch::ScmpArchMipsel64,
        _ => return None,
    })
}

fn spec_err(e: impl std::fmt::Display) -> SeccompError {
    SeccompError::Spec(e.to_string())
}

/// Translates a Docker-format seccomp profile for `host`, as Moby does.
pub fn translate(profile_json: &str, host: &Host) -> Result<LinuxSeccomp, SeccompError> {
    let profile: Profile = serde_json::from_str(profile_json)?;
    let mut architectures = Vec::new();
    if !profile.arch_map.is_empty() {
        let native = native_arch(&host.arch).ok_or_else(|| SeccompError::UnknownArch(host.arch.clone()))?;
        let entry = profile
            .arch_map
            .iter()
            .find(|a| a.architecture == native)
            .ok_or_else(|| SeccompError::UnknownArch(host.arch.clone()))?;
        architectures.push(entry.architecture);
        architectures.extend(entry.sub_architectures.iter().flatten().copied());
    }
    let kernel_at_least = |v: &Option<String>| -> Result<Option<bool>, SeccompError> {
        v.as_ref()
            .map(|v| parse_kernel(v).map(|min| host.kernel >= min).ok_or_else(|| SeccompError::MinKernel(v.clone())))
            .transpose()
    };
    let has_cap = |c: &String| host.caps.iter().any(|h| h == c);
    let mut syscalls = Vec::new();
    for e in profile.syscalls {
        let ex = &e.excludes;
        if ex.arches.contains(&host.arch)
            || ex.caps.iter().any(has_cap)
            || kernel_at_least(&ex.min_kernel)? == Some(true)
        {
            continue;
        }
        let inc = &e.includes;
        if (!inc.arches.is_empty() && !inc.arches.contains(&host.arch))
            || !inc.caps.iter().all(has_cap)
            || kernel_at_least(&inc.min_kernel)? == Some(false)
        {
            continue;
        }
        let mut b = oci_spec::runtime::LinuxSyscallBuilder::default().names(e.names).action(e.action);
        if let Some(errno) = e.errno_ret {
            b = b.errno_ret(errno);
        }
        if let Some(args) = e.args {
            let args =
                args.into_iter().map(|a| arg(a.index, a.op, a.value, a.value_two)).collect::<Result<Vec<_>, _>>()?;
            b = b.args(args);
        }
        syscalls.push(b.build().map_err(spec_err)?);
    }
    let mut b = oci_spec::runtime::LinuxSeccompBuilder::default()
        .default_action(profile.default_action)
        .architectures(architectures)
        .syscalls(syscalls);
    if let Some(errno) = profile.default_errno_ret {
        b = b.default_errno_ret(errno);
    }
    b.build().map_err(spec_err)
}

fn arg(index: usize, op: LinuxSeccompOperator, value: u64, value_two: u64) -> Result<LinuxSeccompArg, SeccompError> {
    oci_spec::runtime::LinuxSeccompArgBuilder::default()
        .index(index)
        .op(op)
        .value(value)
        .value_two(value_two)
        .build()
        .map_err(spec_err)
}

/// `AF_NETLINK`.
const AF_NETLINK: u32 = 16;
/// `NETLINK_NETFILTER`.
const NETLINK_NETFILTER: u32 = 12;

/// Covers the 32-bit range `lo..=hi` with aligned power-of-two blocks, each a
/// `(mask, value)` for SCMP_CMP_MASKED_EQ: `arg & mask == value` holds exactly
/// for the arguments whose low 32 bits lie in the block, whatever the high bits.
pub fn low32_blocks(lo: u32, hi: u32) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u64::from(lo), u64::from(hi));
    while lo <= hi {
        let mut size = if lo == 0 { 1u64 << 32 } else { 1u64 << lo.trailing_zeros().min(32) };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((0xFFFF_FFFF & !(size - 1), lo));
        lo += size;
    }
    out
}

/// The `socket` rules: every family but `AF_NETLINK` and `AF_VSOCK` (Docker
/// refuses vsock too) up to 47, and netlink with any protocol up to 31 but
/// `NETLINK_NETFILTER`. One comparison per argument and rule: runc splits a
/// rule with two comparisons of one argument into separate rules (an OR).
fn socket_rules() -> Result<Vec<LinuxSyscall>, SeccompError> {
    let masked = |index, (mask, value)| arg(index, LinuxSeccompOperator::ScmpCmpMaskedEq, mask, value);
    let rule = |args: Vec<LinuxSeccompArg>| {
        oci_spec::runtime::LinuxSyscallBuilder::default()
            .names(vec!["socket".to_owned()])
            .action(LinuxSeccompAction::ScmpActAllow)
            .args(args)
            .build()
            .map_err(spec_err)
    };
    let mut rules = Vec::new();
    for (lo, hi) in [(0, AF_NETLINK - 1), (AF_NETLINK + 1, 39), (41, 47)] {
        for block in low32_blocks(lo, hi) {
            rules.push(rule(vec![masked(0, block)?])?);
        }
    }
    let netlink = masked(0, (0xFFFF_FFFF, u64::from(AF_NETLINK)))?;
    for (lo, hi) in [(0, NETLINK_NETFILTER - 1), (NETLINK_NETFILTER + 1, 31)] {
        for block in low32_blocks(lo, hi) {
            rules.push(rule(vec![netlink, masked(2, block)?])?);
        }
    }
    Ok(rules)
}

/// Calls Docker allows that swarmd refuses all the same.
const REFUSED: &[&str] = &["ptrace", "process_vm_readv", "process_vm_writev"];

/// swarmd's amendments to Docker's profile (see `worker/seccomp/README.md`):
/// `io_uring_*` and [`REFUSED`] removed; `socket` replaced by [`socket_rules`].
pub fn swarmd_amendments(mut s: LinuxSeccomp) -> Result<LinuxSeccomp, SeccompError> {
    let mut syscalls = Vec::new();
    for mut call in s.syscalls().clone().unwrap_or_default() {
        let names: Vec<String> = call
            .names()
            .iter()
            .filter(|n| !n.starts_with("io_uring_") && *n != "socket" && !REFUSED.contains(&n.as_str()))
            .cloned()
            .collect();
        if names.is_empty() {
            continue;
        }
        call.set_names(names);
        syscalls.push(call);
    }
    syscalls.extend(socket_rules()?);
    s.set_syscalls(Some(syscalls));
    Ok(s)
}

/// The filter every task runs under: Docker's default profile for this host,
/// with swarmd's amendments.
pub fn default_filter() -> Result<LinuxSeccomp, SeccompError> {
    swarmd_amendments(translate(DOCKER_DEFAULT_PROFILE, &Host::current())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(arch: &str, kernel: (u32, u32)) -> Host {
        Host { arch: arch.into(), kernel, caps: Vec::new() }
    }

    fn filter(h: &Host) -> LinuxSeccomp {
        swarmd_amendments(translate(DOCKER_DEFAULT_PROFILE, h).unwrap()).unwrap()
    }

    fn rules<'a>(s: &'a LinuxSeccomp, name: &str) -> Vec<&'a LinuxSyscall> {
        s.syscalls().as_ref().unwrap().iter().filter(|c| c.names().iter().any(|n| n == name)).collect()
    }

    fn allowed_unconditionally(s: &LinuxSeccomp, name: &str) -> bool {
        rules(s, name).iter().any(|c| c.action() == LinuxSeccompAction::ScmpActAllow && c.args().is_none())
    }

    #[test]
    fn invariant_9_the_default_is_to_refuse_with_eperm() {
        let s = filter(&host("amd64", (6, 1)));
        assert_eq!(s.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(s.default_errno_ret(), Some(1));
        assert_eq!(
            s.architectures().as_deref(),
            Some(&[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32][..])
        );
        for name in ["read", "write", "execve", "fork", "wait4", "openat", "personality"] {
            assert!(!rules(&s, name).is_empty(), "{name} missing");
        }
    }

    #[test]
    fn invariant_9_clone_only_without_namespace_flags_and_clone3_enosys() {
        let s = filter(&host("amd64", (6, 1)));
        let clone = rules(&s, "clone");
        assert_eq!(clone.len(), 1, "{clone:#?}");
        assert_eq!(clone[0].action(), LinuxSeccompAction::ScmpActAllow);
        let args = clone[0].args().as_ref().expect("clone is filtered by its flags");
        assert_eq!(args.len(), 1);
        assert_eq!(
            (args[0].index(), args[0].op(), args[0].value(), args[0].value_two().unwrap_or(0)),
            (0, LinuxSeccompOperator::ScmpCmpMaskedEq, 0x7E02_0000, 0)
        );
        let clone3 = rules(&s, "clone3");
        assert_eq!(clone3.len(), 1);
        assert_eq!(clone3[0].action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(clone3[0].errno_ret(), Some(38), "clone3 must answer ENOSYS");
        // s390's argument order is not used elsewhere.
        let s390 = filter(&host("s390x", (6, 1)));
        assert_eq!(rules(&s390, "clone")[0].args().as_ref().unwrap()[0].index(), 1);
    }

    #[test]
    fn invariant_9_capability_gated_calls_and_io_uring_are_absent() {
        let s = filter(&host("amd64", (6, 1)));
        for name in [
            "unshare",
            "mount",
            "umount2",
            "setns",
            "bpf",
            "init_module",
            "kexec_load",
            "keyctl",
            "add_key",
            "reboot",
            "chroot",
            "open_by_handle_at",
            "perf_event_open",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "sethostname",
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
        ] {
            assert!(rules(&s, name).is_empty(), "{name} is allowed");
        }
        // With CAP_SYS_ADMIN, Docker would allow mount and unshare and any clone.
        let admin = Host { caps: vec!["CAP_SYS_ADMIN".into()], ..host("amd64", (6, 1)) };
        let a = filter(&admin);
        assert!(allowed_unconditionally(&a, "mount") && allowed_unconditionally(&a, "clone"));
        assert!(rules(&a, "clone3").iter().all(|c| c.action() == LinuxSeccompAction::ScmpActAllow));
    }

    #[test]
    fn invariant_9_min_kernel_and_arch_specific_entries() {
        // Docker allows ptrace from 4.8 on (earlier kernels let ptrace bypass
        // seccomp); swarmd's amendments refuse it on every kernel.
        let docker = |k| translate(DOCKER_DEFAULT_PROFILE, &host("amd64", k)).unwrap();
        assert!(rules(&docker((4, 4)), "ptrace").is_empty());
        assert!(allowed_unconditionally(&docker((4, 8)), "ptrace"));
        assert!(allowed_unconditionally(&docker((6, 1)), "process_vm_readv"));
        for name in REFUSED {
            assert!(rules(&filter(&host("amd64", (6, 1))), name).is_empty(), "{name} is allowed");
        }
        let amd64 = filter(&host("amd64", (6, 1)));
        let arm64 = filter(&host("arm64", (6, 1)));
        assert!(allowed_unconditionally(&amd64, "arch_prctl") && allowed_unconditionally(&amd64, "modify_ldt"));
        assert!(rules(&arm64, "arch_prctl").is_empty() && rules(&arm64, "modify_ldt").is_empty());
        assert!(allowed_unconditionally(&arm64, "set_tls") && rules(&amd64, "set_tls").is_empty());
        assert_eq!(arm64.architectures().as_deref(), Some(&[Arch::ScmpArchAarch64, Arch::ScmpArchArm][..]));
        assert!(matches!(translate(DOCKER_DEFAULT_PROFILE, &host("vax", (6, 1))), Err(SeccompError::UnknownArch(_))));
    }

    /// Evaluates the socket rules as libseccomp would: any rule whose every
    /// comparison holds allows.
    fn socket_allowed(s: &LinuxSeccomp, args: [u64; 3]) -> bool {
        rules(s, "socket").iter().any(|r| {
            r.action() == LinuxSeccompAction::ScmpActAllow
                && r.args().as_ref().is_some_and(|a| {
                    a.iter().all(|c| {
                        assert_eq!(c.op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
                        args[c.index()] & c.value() == c.value_two().unwrap_or(0)
                    })
                })
        })
    }

    #[test]
    fn invariant_9_no_netfilter_netlink_socket() {
        let s = filter(&host("amd64", (6, 1)));
        for r in rules(&s, "socket") {
            let idx: Vec<usize> = r.args().as_ref().unwrap().iter().map(|a| a.index()).collect();
            let mut dedup = idx.clone();
            dedup.dedup();
            assert_eq!(idx, dedup, "two comparisons of one argument in a rule");
        }
        let (inet, unix, inet6, packet, vsock) = (2, 1, 10, 17, 40);
        for family in [unix, inet, inet6, packet, 0, 15, 39, 41, 47] {
            assert!(socket_allowed(&s, [family, 1, 0]), "family {family}");
        }
        for proto in [0, 11, 13, 15, 31] {
            assert!(socket_allowed(&s, [16, 3, proto]), "netlink protocol {proto}");
        }
        assert!(!socket_allowed(&s, [16, 3, 12]), "NETLINK_NETFILTER");
        assert!(!socket_allowed(&s, [vsock, 1, 0]), "AF_VSOCK");
        assert!(!socket_allowed(&s, [48, 1, 0]) && !socket_allowed(&s, [16, 3, 32]));
        // High bits do not disguise a family or a protocol (the kernel reads ints).
        assert!(!socket_allowed(&s, [(1 << 32) | 16, 3, 12]));
        assert!(!socket_allowed(&s, [16, 3, (1 << 32) | 12]));
        assert!(socket_allowed(&s, [(1 << 32) | 2, 1, 0]));
    }

    #[test]
    fn blocks_cover_exactly_the_range() {
        for (lo, hi) in [(0, 15), (17, 39), (41, 47), (0, 11), (13, 31), (5, 5), (0, u32::MAX), (1, u32::MAX - 1)] {
            let blocks = low32_blocks(lo, hi);
            let inside = |v: u64| blocks.iter().any(|(m, x)| v & m == *x);
            for v in [lo.saturating_sub(1), lo, hi, hi.saturating_add(1), lo / 2 + hi / 2] {
                let want = (lo..=hi).contains(&v);
                assert_eq!(inside(u64::from(v)), want, "{v} in {lo}..={hi}: {blocks:x?}");
            }
            if hi - lo < 64 {
                for v in lo.saturating_sub(3)..=hi.saturating_add(3) {
                    assert_eq!(inside(u64::from(v)), (lo..=hi).contains(&v), "{v} in {lo}..={hi}");
                }
            }
        }
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_kernel("6.18.44-fc-v1045\n"), Some((6, 18)));
        assert_eq!(parse_kernel("4.8"), Some((4, 8)));
        assert_eq!(parse_kernel("5"), Some((5, 0)));
        assert_eq!(parse_kernel("x"), None);
    }
}
