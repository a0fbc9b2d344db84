//! SWE tasks on Modal with per-task images (`--modal-image`, a row's `image_name`), tested with
//! the scripted stand-in for Modal's SDK (tests/data/remote/modal_stand_in.py), because Modal
//! cannot be reached from here: its sandboxes are real `rollbox serve` processes on loopback,
//! and nothing of Modal itself (image builds, registries, scheduling) is exercised.

use std::path::Path;

use rollbox::rollout::swe;
use serde_json::json;

use crate::remote::ModalStandIn;

const IMAGE_A: &str = "registry.invalid/swe/calc-a:1";
const IMAGE_B: &str = "registry.invalid/swe/calc-b:1";
const DEFAULT_IMAGE: &str = "registry.invalid/swe/base:1";

/// Three copies of the example task in `dir`: two naming their own images, one naming none.
fn dataset_with_images(dir: &Path) -> std::path::PathBuf {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let repo = dir.join("calc.git");
    swe::build_repo(&examples.join("swe/calc"), &repo, "calc: the example's base commit").expect("build");
    let example: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(examples.join("swe.jsonl"))
            .expect("the example")
            .lines()
            .next()
            .expect("a row"),
    )
    .expect("JSON");
    let mut lines = String::new();
    for (id, image) in [("with-a", Some(IMAGE_A)), ("with-b", Some(IMAGE_B)), ("without", None)] {
        let mut row = example.clone();
        row["instance_id"] = json!(id);
        row["repo"] = json!(repo);
        row.as_object_mut().expect("an object").remove("repo_source");
        if let Some(image) = image {
            row["image_name"] = json!(image);
        }
        lines.push_str(&format!("{row}\n"));
    }
    let path = dir.join("tasks.jsonl");
    std::fs::write(&path, lines).expect("write the dataset");
    path
}

fn rollbox_rollout(dataset: &Path, stand_in: &ModalStandIn, extra: &[&str]) -> std::process::Output {
    let cache = tempfile::tempdir().expect("tempdir");
    std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args(["rollout", "--dataset"])
        .arg(dataset)
        .args([
            "--backend",
            "remote",
            "--provision",
            "modal",
            "--modal-image",
            DEFAULT_IMAGE,
        ])
        .arg("--modal-python")
        .arg(&stand_in.python)
        .args(extra)
        .env(rollbox::env_vars::CACHE_DIR, cache.path())
        .output()
        .expect("run rollbox")
}

#[test]
fn dry_run_prints_per_image_what_would_be_created_without_importing_modal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = dataset_with_images(dir.path());
    let stand_in = ModalStandIn::new("raise ImportError('the dry run imported modal')\n", json!({}));
    let out = rollbox_rollout(&dataset, &stand_in, &["--dry-run", "--out", "unused"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the plan is JSON");
    let per_image = plan["per_image"].as_array().expect("per image");
    let summary: Vec<(String, serde_json::Value, String)> = per_image
        .iter()
        .map(|group| {
            let first_call = &group["servers"]["image"][0];
            assert_eq!(first_call["call"], "modal.Image.from_registry", "{group:#}");
            (
                group["image"].as_str().expect("an image").to_owned(),
                group["instances"].clone(),
                first_call["args"][0].as_str().expect("a ref").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (DEFAULT_IMAGE.to_owned(), json!(["without"]), DEFAULT_IMAGE.to_owned()),
            (IMAGE_A.to_owned(), json!(["with-a"]), IMAGE_A.to_owned()),
            (IMAGE_B.to_owned(), json!(["with-b"]), IMAGE_B.to_owned()),
        ]
    );
    assert!(
        per_image
            .iter()
            .all(|g| g["servers"]["image"].as_array().is_some_and(|calls| calls.len() == 3)),
        "from_registry, the binary, its chmod: no apt_install on a registry image"
    );
}

/// A real rollout over the stand-in: each of the three images gets its own sandbox, started
/// from its own image, and every trajectory scores 1.0 on the process servers inside.
#[test]
fn each_image_gets_its_own_sandboxes_and_the_rollout_scores_on_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = dataset_with_images(dir.path());
    let stand_in = ModalStandIn::recording(json!({ "serve_args": ["--backend", "process"] }));
    let out_dir = dir.path().join("out");
    let out = rollbox_rollout(
        &dataset,
        &stand_in,
        &[
            "--group-size",
            "2",
            "--max-sandboxes",
            "1",
            "--out",
            out_dir.to_str().expect("a UTF-8 path"),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).expect("summary")).expect("JSON");
    assert_eq!(
        (&summary["mean_reward"], &summary["trajectories"]),
        (&json!(1.0), &json!(6)),
        "{summary:#}"
    );
    let mut images: Vec<String> = stand_in
        .calls_named("Sandbox.create")
        .iter()
        .map(|c| c["image"].as_str().expect("an image tag").to_owned())
        .collect();
    images.sort();
    let mut expected = vec![IMAGE_A.to_owned(), IMAGE_B.to_owned(), DEFAULT_IMAGE.to_owned()];
    expected.sort();
    assert_eq!(images, expected, "one sandbox per image, each from its own image");
    assert_eq!(
        stand_in.calls_named("Sandbox.terminate").len(),
        3,
        "every sandbox ends with the run"
    );
}

/// The router itself, over two remote backends of two images: slots of instance `a` (its
/// samples and its reward slot alike) land on image A's sandbox only, `b`'s on image B's only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_of_different_images_never_share_a_sandbox() {
    use std::collections::HashMap;
    use std::sync::Arc;

    use rollbox::remote::provision::{ModalConfig, PerImageBackend};
    use rollbox::remote::{PoolConfig, ProvisionConfig, RemoteBackend, RemoteBackendConfig};
    use rollbox::{Backend, ToolCall};

    let stand_in = ModalStandIn::recording(json!({}));
    let start = |image: &str| {
        let config = RemoteBackendConfig {
            pool: PoolConfig {
                slots_per_server: 8,
                min_servers: 1,
                max_servers: 1,
                ..PoolConfig::default()
            },
            provision: ProvisionConfig::Modal(ModalConfig {
                image: Some(image.to_owned()),
                ..stand_in.config()
            }),
        };
        async move { Arc::new(RemoteBackend::start(config).await.expect("start")) }
    };
    let (a, b) = (start(IMAGE_A).await, start(IMAGE_B).await);
    let routes = HashMap::from([
        ("a".to_owned(), IMAGE_A.to_owned()),
        ("b".to_owned(), IMAGE_B.to_owned()),
    ]);
    let backends: HashMap<String, Arc<dyn Backend>> = HashMap::from([
        (IMAGE_A.to_owned(), a.clone() as Arc<dyn Backend>),
        (IMAGE_B.to_owned(), b.clone() as Arc<dyn Backend>),
    ]);
    let router = PerImageBackend::new(routes, backends, IMAGE_A.to_owned()).expect("router");
    let mut slots = Vec::new();
    for trajectory in ["a/0", "b/0", "a/1", "b/1/reward"] {
        slots.push(router.acquire(trajectory).await.expect("acquire"));
    }
    let ids: std::collections::HashSet<_> = slots.iter().map(|s| s.id).collect();
    assert_eq!(ids.len(), 4, "the router's slot ids are its own: {slots:?}");
    let answers = router
        .execute_batch(slots.iter().map(|s| (s.clone(), ToolCall::python("6 * 7"))).collect())
        .await;
    assert!(
        answers.iter().all(|r| r.success && r.output.contains("42")),
        "{answers:?}"
    );
    let image_of_sandbox: HashMap<String, String> = stand_in
        .calls_named("Sandbox.create")
        .iter()
        .map(|c| {
            (
                c["id"].as_str().expect("id").to_owned(),
                c["image"].as_str().expect("image").to_owned(),
            )
        })
        .collect();
    for (backend, image) in [(&a, IMAGE_A), (&b, IMAGE_B)] {
        let servers = backend.servers();
        assert_eq!(servers.len(), 1);
        assert_eq!(servers[0].slots, 2, "two slots of {image}'s instance: {servers:?}");
        assert_eq!(
            image_of_sandbox[&servers[0].id], image,
            "its sandbox started from its image"
        );
    }
    for slot in &slots {
        router.release(slot, true).await.expect("release");
    }
    router.shutdown().await.expect("shutdown");
    assert_eq!(stand_in.calls_named("Sandbox.terminate").len(), 2);
}

/// Whether the ELF file's program headers include PT_INTERP (a dynamic loader's path): a
/// dynamically linked executable has one, a static one has none.
fn has_program_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let read = |at: usize, len: usize| -> u64 {
        elf[at..at + len]
            .iter()
            .rev()
            .fold(0, |value, byte| (value << 8) | u64::from(*byte))
    };
    assert_eq!(&elf[..5], b"\x7fELF\x02", "a 64-bit ELF file");
    let (offset, entry_size, count) = (read(0x20, 8) as usize, read(0x36, 2) as usize, read(0x38, 2) as usize);
    (0..count).any(|index| read(offset + index * entry_size, 4) as u32 == PT_INTERP)
}

/// The static build the Modal image gets (scripts/build-static-rollbox.sh; opt-in, since the
/// release build takes 15+ minutes): no program interpreter, and it runs in a bubblewrap sandbox
/// that holds nothing but itself (no /lib, no /usr), as it must in any image.
#[test]
#[ignore = "needs the static release build: ROLLBOX_STATIC_BINARY=$(scripts/build-static-rollbox.sh)"]
fn the_static_build_needs_no_loader_and_runs_alone_in_an_empty_sandbox() {
    let binary = std::env::var_os(rollbox::env_vars::STATIC_BINARY)
        .map(std::path::PathBuf::from)
        .expect("ROLLBOX_STATIC_BINARY names the static build");
    let elf = std::fs::read(&binary).expect("read the binary");
    assert!(
        !has_program_interpreter(&elf),
        "{} asks for a dynamic loader",
        binary.display()
    );
    let dynamic = std::fs::read(env!("CARGO_BIN_EXE_rollbox")).expect("read the test build");
    assert!(
        has_program_interpreter(&dynamic),
        "the check tells a dynamic build apart"
    );
    let run = std::process::Command::new("bwrap")
        .arg("--ro-bind")
        .arg(&binary)
        .args(["/rollbox", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"])
        .args([
            "--unshare-all",
            "--die-with-parent",
            "--clearenv",
            "--",
            "/rollbox",
            "--version",
        ])
        .output()
        .expect("run bwrap");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(
        String::from_utf8_lossy(&run.stdout).starts_with("rollbox "),
        "{:?}",
        run
    );
}

/// Rows naming images on a backend that has no images run there all the same, and the rollout
/// says their images were not used: nothing is dropped in silence.
#[test]
fn image_rows_on_the_process_backend_run_with_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = dataset_with_images(dir.path());
    let cache = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("out");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args(["rollout", "--backend", "process", "--dataset"])
        .arg(&dataset)
        .arg("--out")
        .arg(&out_dir)
        .env(rollbox::env_vars::CACHE_DIR, cache.path())
        .output()
        .expect("run rollbox");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: 2 SWE row(s) name an image_name, which only --backend remote --provision modal uses"),
        "{stderr}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).expect("summary")).expect("JSON");
    assert_eq!(summary["mean_reward"], json!(1.0), "{summary:#}");
}
