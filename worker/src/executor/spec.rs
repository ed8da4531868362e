//! The OCI runtime spec of a task's container, least-privilege by default
//! (invariant 9); the defaults are listed in [`super`]'s overview.

use oci_spec::runtime::{
    LinuxCapabilities, LinuxIdMappingBuilder, LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxPidsBuilder, LinuxSeccomp, Mount, MountBuilder, Spec, UserBuilder,
};

use super::{ContainerSpec, ExecError, UserNamespace};
use crate::userns::BLOCK_SIZE;

fn spec_err(e: impl std::fmt::Display) -> ExecError {
    ExecError::Spec(e.to_string())
}

fn seccomp() -> Result<LinuxSeccomp, ExecError> {
    crate::seccomp::default_filter().map_err(|e| ExecError::Spec(e.to_string()))
}

fn tmpfs(dest: &str, options: &[&str]) -> Result<Mount, ExecError> {
    MountBuilder::default()
        .destination(dest)
        .typ("tmpfs")
        .source("tmpfs")
        .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(|e| ExecError::Spec(e.to_string()))
}

/// The OCI spec for `c`, or why the policy refuses it.
pub fn build_spec(c: &ContainerSpec, hostname: &str) -> Result<Spec, ExecError> {
    if c.privileged {
        return Err(ExecError::Refused("privileged containers are not allowed in this cluster".into()));
    }
    if !c.cap_add.is_empty() {
        return Err(ExecError::Refused(format!(
            "adding capabilities ({}) is not allowed in this cluster",
            c.cap_add.join(", ")
        )));
    }
    if c.args.is_empty() {
        return Err(ExecError::Spec("no command to run".into()));
    }
    let mut spec = Spec::default();
    spec.set_hostname(Some(hostname.to_owned()));
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(c.rootfs.clone());
    root.set_readonly(Some(true));
    spec.set_root(Some(root));

    let (uid, gid) = c.user.unwrap_or((65534, 65534));
    c.userns.host_id(uid, "uid")?;
    c.userns.host_id(gid, "gid")?;
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_user(UserBuilder::default().uid(uid).gid(gid).build().map_err(|e| ExecError::Spec(e.to_string()))?);
    process.set_args(Some(c.args.clone()));
    let mut env = vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned()];
    env.extend(c.env.iter().cloned());
    process.set_env(Some(env));
    process.set_cwd(c.cwd.clone().filter(|d| d.starts_with('/')).unwrap_or_else(|| "/".into()).into());
    process.set_no_new_privileges(Some(true));
    let none = oci_spec::runtime::Capabilities::default();
    let mut caps = LinuxCapabilities::default();
    caps.set_bounding(Some(none.clone()));
    caps.set_effective(Some(none.clone()));
    caps.set_inheritable(Some(none.clone()));
    caps.set_permitted(Some(none.clone()));
    caps.set_ambient(Some(none));
    process.set_capabilities(Some(caps));
    spec.set_process(Some(process));

    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.push(tmpfs("/tmp", &["nosuid", "nodev", "mode=1777", "size=67108864"])?);
    mounts.push(tmpfs("/run", &["nosuid", "nodev", "noexec", "mode=755", "size=1048576"])?);
    if let Some(dir) = &c.secrets_dir {
        mounts.push(
            MountBuilder::default()
                .destination("/run/secrets")
                .typ("bind")
                .source(dir.clone())
                .options(["rbind", "ro", "nosuid", "nodev", "noexec"].iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .build()
                .map_err(|e| ExecError::Spec(e.to_string()))?,
        );
    }
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut ns = linux.namespaces().clone().unwrap_or_default();
    if c.host_network {
        ns.retain(|n| n.typ() != LinuxNamespaceType::Network);
    }
    if let UserNamespace::Private(block) = c.userns {
        let user = LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::User).build().map_err(spec_err)?;
        ns.push(user);
        let map = LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(block.base())
            .size(BLOCK_SIZE)
            .build()
            .map_err(spec_err)?;
        linux.set_uid_mappings(Some(vec![map]));
        linux.set_gid_mappings(Some(vec![map]));
        if c.host_network {
            // sysfs belongs to the network namespace: one owned by another
            // user namespace refuses the mount. The host's, read-only, instead.
            for m in mounts.iter_mut().filter(|m| m.typ().as_deref() == Some("sysfs")) {
                *m = MountBuilder::default()
                    .destination("/sys")
                    .typ("bind")
                    .source("/sys")
                    .options(["rbind", "ro", "nosuid", "nodev", "noexec"].map(String::from).to_vec())
                    .build()
                    .map_err(spec_err)?;
            }
        }
    }
    linux.set_namespaces(Some(ns));
    spec.set_mounts(Some(mounts));
    let mut resources = linux.resources().clone().unwrap_or_default();
    if let Some(m) = c.memory {
        resources.set_memory(Some(
            LinuxMemoryBuilder::default().limit(m).swap(m).build().map_err(|e| ExecError::Spec(e.to_string()))?,
        ));
    }
    if let Some(p) = c.pids {
        resources
            .set_pids(Some(LinuxPidsBuilder::default().limit(p).build().map_err(|e| ExecError::Spec(e.to_string()))?));
    }
    linux.set_resources(Some(resources));
    linux.set_seccomp(Some(seccomp()?));
    spec.set_linux(Some(linux));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::userns::UsernsError;

    fn namespaces(spec: &Spec) -> Vec<LinuxNamespaceType> {
        spec.linux().as_ref().unwrap().namespaces().as_ref().unwrap().iter().map(|n| n.typ()).collect()
    }

    fn mount<'a>(spec: &'a Spec, dest: &str) -> Option<&'a Mount> {
        spec.mounts().as_ref().unwrap().iter().find(|m| m.destination() == Path::new(dest))
    }

    #[test]
    fn the_default_spec_is_least_privilege_and_privilege_is_refused() {
        let block = crate::userns::IdBlock::new(5).unwrap();
        let c = ContainerSpec {
            rootfs: "/r".into(),
            args: vec!["true".into()],
            secrets_dir: Some("/s".into()),
            userns: UserNamespace::Private(block),
            ..Default::default()
        };
        let spec = build_spec(&c, "t").unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (65534, 65534));
        assert_eq!(p.no_new_privileges(), Some(true));
        let caps = p.capabilities().as_ref().unwrap();
        for set in [caps.bounding(), caps.effective(), caps.permitted(), caps.inheritable(), caps.ambient()] {
            assert!(set.as_ref().is_some_and(|s| s.is_empty()));
        }
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux.seccomp().is_some());
        let ns = namespaces(&spec);
        for t in [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Cgroup,
            LinuxNamespaceType::Network,
            LinuxNamespaceType::User,
        ] {
            assert!(ns.contains(&t), "{t:?}");
        }
        let secrets = mount(&spec, "/run/secrets").unwrap();
        // Inside a user namespace a read-only bind needs the locked flags repeated (runc#1229).
        for o in ["ro", "nosuid", "nodev", "noexec"] {
            assert!(secrets.options().as_ref().unwrap().iter().any(|x| x == o), "{o}");
        }

        let host = build_spec(&ContainerSpec { host_network: true, ..c.clone() }, "t").unwrap();
        let ns = namespaces(&host);
        assert!(!ns.contains(&LinuxNamespaceType::Network));
        assert!(ns.contains(&LinuxNamespaceType::User));
        // No network namespace of its own: no sysfs mount from the user
        // namespace, the host's /sys read-only instead.
        let sys = mount(&host, "/sys").unwrap();
        assert_eq!(sys.typ().as_deref(), Some("bind"));
        for o in ["rbind", "ro", "nosuid", "nodev", "noexec"] {
            assert!(sys.options().as_ref().unwrap().iter().any(|x| x == o), "{o}");
        }
        assert_eq!(mount(&spec, "/sys").unwrap().typ().as_deref(), Some("sysfs"));
        assert!(matches!(
            build_spec(&ContainerSpec { privileged: true, ..c.clone() }, "t"),
            Err(ExecError::Refused(_))
        ));
        let caps = ContainerSpec { cap_add: vec!["NET_ADMIN".into()], ..c.clone() };
        assert!(matches!(build_spec(&caps, "t"), Err(ExecError::Refused(_))));
    }

    #[test]
    fn invariant_9_every_container_gets_a_user_namespace_of_its_own_unless_host_is_asked() {
        let block = crate::userns::IdBlock::new(2).unwrap();
        let c = ContainerSpec {
            rootfs: "/r".into(),
            args: vec!["true".into()],
            userns: UserNamespace::Private(block),
            ..Default::default()
        };
        let spec = build_spec(&c, "t").unwrap();
        let linux = spec.linux().as_ref().unwrap();
        for maps in [linux.uid_mappings(), linux.gid_mappings()] {
            let maps = maps.as_ref().unwrap();
            assert_eq!(maps.len(), 1);
            let m = maps[0];
            assert_eq!((m.container_id(), m.host_id(), m.size()), (0, (1 << 31) + 2 * 65536, 65536));
        }
        // The task's user stays 65534 inside; the host sees base + 65534.
        let user = spec.process().as_ref().unwrap().user();
        assert_eq!((user.uid(), user.gid()), (65534, 65534));

        // A forgotten choice is refused, never the host's namespace.
        let unset = ContainerSpec { userns: UserNamespace::Unset, ..c.clone() };
        assert!(matches!(build_spec(&unset, "t"), Err(ExecError::Userns(UsernsError::Unset))));
        // IDs the namespace does not map are refused with what to do.
        let far = ContainerSpec { user: Some((70_000, 0)), ..c.clone() };
        let e = build_spec(&far, "t").unwrap_err();
        assert!(e.to_string().contains("--userns host"), "{e}");
        // --userns host: no user namespace, no mappings, uid 70000 allowed.
        let host = build_spec(&ContainerSpec { userns: UserNamespace::Host, ..far }, "t").unwrap();
        assert!(!namespaces(&host).contains(&LinuxNamespaceType::User));
        assert!(host.linux().as_ref().unwrap().uid_mappings().as_ref().is_none_or(|m| m.is_empty()));
    }
}
