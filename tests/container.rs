//! The Dockerfile and docker-compose.yml cannot be built here (no Docker engine), so this checks
//! that they agree with the real CLI, the real configuration files and each other.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The JSON array of a Dockerfile instruction such as `CMD ["run", ...]`.
fn instruction_array(dockerfile: &str, instruction: &str) -> Vec<String> {
    let line = dockerfile
        .lines()
        .find(|l| l.starts_with(&format!("{instruction} [")))
        .unwrap_or_else(|| panic!("no {instruction} [...] in the Dockerfile"));
    serde_json::from_str(&line[instruction.len()..]).expect("an exec-form JSON array")
}

fn strings(yaml: &Yaml) -> Vec<String> {
    yaml.as_vec()
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The value after `--config` in an argument list.
fn config_arg(args: &[String]) -> String {
    args.iter()
        .skip_while(|a| *a != "--config")
        .nth(1)
        .cloned()
        .expect("--config FILE in the command")
}

/// Port numbers of a config's listeners and admin listener, as written (before interpolation).
fn config_ports(config: &str) -> Vec<u16> {
    let table: toml::Table = toml::from_str(config).unwrap();
    let mut addresses: Vec<String> = table["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["address"].as_str().unwrap().to_owned())
        .collect();
    if let Some(admin) = table.get("admin") {
        addresses.push(admin["address"].as_str().unwrap().to_owned());
    }
    addresses
        .iter()
        .map(|a| a.rsplit(':').next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn dockerfile_matches_the_cli_and_its_configuration() {
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    assert_eq!(instruction_array(&dockerfile, "ENTRYPOINT"), ["cachegate"]);
    let cmd = instruction_array(&dockerfile, "CMD");
    assert_eq!(cmd[0], "run", "the first argument is a real subcommand");
    let config_path = config_arg(&cmd);

    // The configuration the image runs with is copied from the repository to that path.
    let copy = dockerfile
        .lines()
        .find(|l| l.starts_with("COPY config/") && l.trim_end().ends_with(&config_path))
        .unwrap_or_else(|| panic!("no COPY of a config/ file to {config_path}"));
    let source = copy.split_whitespace().nth(1).unwrap();
    let config = std::fs::read_to_string(repo(source)).unwrap_or_else(|e| panic!("{source}: {e}"));

    let exposed: Vec<u16> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| {
            l.split_whitespace()
                .map(|p| p.parse::<u16>().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut ports = config_ports(&config);
    ports.sort_unstable();
    let mut exposed_sorted = exposed.clone();
    exposed_sorted.sort_unstable();
    assert_eq!(
        exposed_sorted, ports,
        "EXPOSE names exactly the configured listener and admin ports"
    );

    let healthcheck = dockerfile
        .lines()
        .skip_while(|l| !l.starts_with("HEALTHCHECK"))
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let admin_port = config_ports(&config).last().copied().unwrap();
    assert!(
        healthcheck.contains(&format!("http://127.0.0.1:{admin_port}/healthz")),
        "the HEALTHCHECK probes the admin listener's /healthz: {healthcheck}"
    );
    assert!(
        dockerfile.contains("USER cachegate"),
        "the runtime image runs as a non-root user"
    );
}

#[test]
fn compose_file_wires_real_paths_ports_and_flags() {
    let compose = std::fs::read_to_string(repo("docker-compose.yml")).unwrap();
    let doc = &YamlLoader::load_from_str(&compose).expect("valid YAML")[0];
    let services = &doc["services"];
    for name in ["redis", "upstream", "cachegate"] {
        assert!(!services[name].is_badvalue(), "service {name} exists");
    }

    // upstream-example runs with its real flags.
    let upstream = &services["upstream"];
    assert_eq!(strings(&upstream["entrypoint"]), ["upstream-example"]);
    let upstream_cmd = strings(&upstream["command"]);
    let listen = upstream_cmd
        .iter()
        .skip_while(|a| *a != "--listen")
        .nth(1)
        .expect("--listen ADDR");
    let upstream_port = listen.rsplit(':').next().unwrap();
    let help = Command::new(common::upstream_bin())
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in upstream_cmd.iter().filter(|a| a.starts_with("--")) {
        assert!(
            help.contains(flag.as_str()),
            "upstream-example has no {flag} flag"
        );
    }

    // cachegate reads a mounted configuration that exists in the repository.
    let gateway = &services["cachegate"];
    let config_path = config_arg(&strings(&gateway["command"]));
    let mount = strings(&gateway["volumes"])
        .into_iter()
        .find(|v| v.split(':').nth(1) == Some(config_path.as_str()))
        .unwrap_or_else(|| panic!("no volume mounted at {config_path}"));
    let source = mount.split(':').next().unwrap().trim_start_matches("./");
    let config = std::fs::read_to_string(repo(source)).unwrap_or_else(|e| panic!("{source}: {e}"));

    // The environment points at the other services by name and the right ports.
    let env = &gateway["environment"];
    assert_eq!(
        env["UPSTREAM_URL"].as_str(),
        Some(format!("http://upstream:{upstream_port}").as_str())
    );
    assert!(env["REDIS_URL"]
        .as_str()
        .unwrap()
        .starts_with("redis://redis:"));
    assert!(
        config.contains("${UPSTREAM_URL") && config.contains("${REDIS_URL"),
        "the config reads both variables"
    );

    // Published container ports are ports the configuration listens on.
    let listening = config_ports(&config);
    for published in strings(&gateway["ports"]) {
        let container_port: u16 = published.rsplit(':').next().unwrap().parse().unwrap();
        assert!(
            listening.contains(&container_port),
            "{published} publishes a port nothing listens on"
        );
    }

    // And the configuration is valid, with the compose environment (service names swapped for
    // loopback, as their DNS names exist only inside compose).
    let out = Command::new(common::cachegate_bin())
        .args(["check", "--config"])
        .arg(repo(source))
        .env("UPSTREAM_URL", format!("http://127.0.0.1:{upstream_port}"))
        .env("REDIS_URL", "redis://127.0.0.1:6379")
        .env("ADMIN_TOKEN", env["ADMIN_TOKEN"].as_str().unwrap_or(""))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
