//! Hosts in network namespaces for tests that need a real LAN (mDNS,
//! partitions): each host is a namespace with one veth into a switch
//! namespace holding a bridge. Nothing touches the host's own network, and
//! everything is removed when the [`Lan`] drops, even after a panic.

use std::process::Command;

/// A set of namespaced hosts on one bridge.
pub struct Lan {
    prefix: String,
    switch: String,
    hosts: Vec<String>,
    front: bool,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Lan {
    /// Creates `n` hosts named `<prefix>h<i>` with addresses `10.77.0.<i+1>/24`.
    /// Panics with the reason when namespaces cannot be made (they need
    /// root or CAP_NET_ADMIN and iproute2).
    pub fn new(n: usize) -> Lan {
        Lan::create(n, false).unwrap_or_else(|err| panic!("{err}"))
    }

    /// Like [`Lan::new`], plus a second, "front" network that clients use:
    /// host `i` is also `10.78.0.<i+1>`, and the switch namespace itself is
    /// `10.78.0.254` there (a thread that [`Lan::enter_switch`]es is the
    /// client). Partitions cut only the first network, so clients still
    /// reach a cut-off node, as users reach a box whose cluster link broke.
    pub fn with_front(n: usize) -> Result<Lan, String> {
        Lan::create(n, true)
    }

    fn create(n: usize, front: bool) -> Result<Lan, String> {
        // Short and unique per test process: interface names max 15 bytes.
        let prefix = format!("lm{}", std::process::id() % 100_000);
        let mut lan = Lan { switch: format!("{prefix}sw"), prefix, hosts: Vec::new(), front };
        // On failure the half-built LAN drops here, which removes it.
        lan.build(n).map_err(|err| format!("cannot create network namespaces (needs root and iproute2): {err}"))?;
        Ok(lan)
    }

    fn build(&mut self, n: usize) -> Result<(), String> {
        ip(&["netns", "add", &self.switch])?;
        ip(&["-n", &self.switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &self.switch, "link", "set", "br0", "up"])?;
        if self.front {
            ip(&["-n", &self.switch, "link", "add", "fr0", "type", "bridge"])?;
            ip(&["-n", &self.switch, "addr", "add", "10.78.0.254/24", "dev", "fr0"])?;
            ip(&["-n", &self.switch, "link", "set", "fr0", "up"])?;
            ip(&["-n", &self.switch, "link", "set", "lo", "up"])?;
        }
        for i in 0..n {
            let host = format!("{}h{i}", self.prefix);
            ip(&["netns", "add", &host])?;
            self.hosts.push(host.clone());
            ip(&["-n", &host, "link", "set", "lo", "up"])?;
            self.plug(&host, (&format!("{}e{i}", self.prefix), &format!("{}b{i}", self.prefix)), "br0")?;
            ip(&[
                "-n",
                &host,
                "addr",
                "add",
                &format!("10.77.0.{}/24", i + 1),
                "dev",
                &format!("{}e{i}", self.prefix),
            ])?;
            if self.front {
                self.plug(&host, (&format!("{}f{i}", self.prefix), &format!("{}g{i}", self.prefix)), "fr0")?;
                let front = format!("10.78.0.{}/24", i + 1);
                ip(&["-n", &host, "addr", "add", &front, "dev", &format!("{}f{i}", self.prefix)])?;
            }
        }
        Ok(())
    }

    /// Connects `host` to `bridge` in the switch namespace with a veth
    /// pair (`inner` in the host, `outer` on the bridge), both up.
    fn plug(&self, host: &str, (inner, outer): (&str, &str), bridge: &str) -> Result<(), String> {
        ip(&["link", "add", inner, "netns", host, "type", "veth", "peer", "name", outer, "netns", &self.switch])?;
        ip(&["-n", &self.switch, "link", "set", outer, "master", bridge])?;
        ip(&["-n", &self.switch, "link", "set", outer, "up"])?;
        ip(&["-n", host, "link", "set", inner, "up"])
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether the LAN has no hosts.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Address of host `i` on the front network (see [`Lan::with_front`]).
    pub fn front_addr(&self, i: usize) -> String {
        format!("10.78.0.{}", i + 1)
    }

    /// Moves the calling thread into the switch namespace, where the front
    /// network's client address is. Threads it starts afterwards (a tokio
    /// runtime's workers) are born there too; the rest of the process stays
    /// where it was.
    pub fn enter_switch(&self) -> Result<(), String> {
        let path = format!("/run/netns/{}", self.switch);
        let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns {path}: {e}"))
    }

    /// Namespace name of host `i`.
    pub fn host(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// IPv4 address of host `i`.
    pub fn addr(&self, i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    /// Cuts host `i` off the LAN (its port leaves the bridge); its own
    /// interface stays up, so it keeps its address and just hears nothing.
    pub fn partition(&self, i: usize) -> Result<(), String> {
        ip(&["-n", &self.switch, "link", "set", &format!("{}b{i}", self.prefix), "nomaster"])
    }

    /// Puts host `i` back on the LAN.
    pub fn heal(&self, i: usize) -> Result<(), String> {
        ip(&["-n", &self.switch, "link", "set", &format!("{}b{i}", self.prefix), "master", "br0"])
    }

    /// Starts an agent with an in-process sim backend inside host `i`, its
    /// HTTP API on `10.77.0.<i+1>:11440` (the next ports follow), its data in
    /// `dir`; `args` add to that (name, token, bootstrap, ...).
    pub async fn agent(&self, i: usize, dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> crate::Proc {
        let listen = format!("{}:11440", self.addr(i));
        let dir = dir.to_str().expect("utf-8 temp path").to_string();
        let mut all = vec!["agent", "--backend-kind", "sim", "--listen", &listen, "--data-dir", &dir];
        all.extend_from_slice(args);
        crate::Proc::start_in_netns_env(self.host(i), &all, env).await
    }

    /// Runs a command inside host `i`'s namespace and returns its stdout.
    pub fn exec(&self, i: usize, program: &std::path::Path, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", self.host(i)])
            .arg(program)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

/// A running `tshark` capture into a file.
pub struct Capture {
    child: std::process::Child,
    /// Where the packets go.
    pub path: std::path::PathBuf,
}

impl Lan {
    /// Starts `tshark` capturing interface `iface` of namespace `ns` (a
    /// host, or [`Lan::switch`] for the bridge that carries every packet
    /// between hosts) into `path`; returns once it captures.
    pub fn capture(&self, ns: &str, iface: &str, path: &std::path::Path) -> Capture {
        use std::io::BufRead as _;
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "tshark", "-q", "-i", iface, "-w"])
            .arg(path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("tshark runs (Debian package tshark; scripts/test.sh installs it)");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = std::io::BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("Capturing on") => break,
                Some(Ok(_)) => continue,
                _ => panic!("tshark did not start capturing on {iface} in {ns}"),
            }
        }
        // Keep draining stderr so tshark never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Capture { child, path: path.to_path_buf() }
    }

    /// Namespace of the bridge between the hosts.
    pub fn switch(&self) -> &str {
        &self.switch
    }
}

impl Capture {
    /// Waits until packets reach the capture file (tshark announces itself
    /// a moment before it captures), calling `poke` to make traffic.
    pub fn wait_for_packets(&self, mut poke: impl FnMut()) {
        let empty = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        for _ in 0..100 {
            poke();
            std::thread::sleep(std::time::Duration::from_millis(100));
            if std::fs::metadata(&self.path).map_or(0, |m| m.len()) > empty {
                return;
            }
        }
        panic!("no packets reached {} in 10 s", self.path.display());
    }

    /// Stops the capture (SIGINT, so tshark flushes) and returns the bytes
    /// of the capture file.
    pub fn finish(mut self) -> Vec<u8> {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        std::fs::read(&self.path).expect("capture file")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.switch)) {
            // Processes left inside (a harness that failed before stopping
            // them) would keep the namespace alive after its name is gone.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            // Deleting a namespace also deletes the veth ends inside it.
            let _ = ip(&["netns", "del", ns]);
        }
    }
}
