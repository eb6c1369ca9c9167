//! Data-parallel runs over PyTorch's c10d (Gloo on 127.0.0.1): the collectives, 2 ranks ×
//! batch B/2 against 1 rank × batch B (fine-tuning and search), resume after a kill, world
//! size 1, a peer that never comes, and a launch through the wheel's torchrun.

mod common;

use gmpq::checkpoint::Checkpoint;
use gmpq::dist::{Backend, Group, Rendezvous};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `gmpq args` as rank `rank` of `world` (torchrun's variables).
fn rank(rank: usize, world: usize, port: u16, args: &[String]) -> Command {
    let mut c = common::gmpq();
    c.args(args)
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("GMPQ_DIST_TIMEOUT", "60");
    c
}

/// Runs `world` ranks of `gmpq args` to the end; every rank must succeed.
fn launch(world: usize, args: &[String]) -> Vec<Output> {
    let port = free_port();
    let children: Vec<Child> = (0..world)
        .map(|r| {
            rank(r, world, port, args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for (r, o) in outputs.iter().enumerate() {
        assert!(o.status.success(), "rank {r}: {}", common::stderr(o));
    }
    outputs
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Every trainable float tensor of a checkpoint (weights, biases, batch-norm affine), in name
/// order, flattened into one vector.
fn parameters(path: &Path) -> Tensor {
    let ck = Checkpoint::load(path).unwrap();
    let mut named: Vec<(&String, &Tensor)> = ck
        .model_tensors()
        .filter(|(n, t)| {
            t.kind() == Kind::Float && (n.ends_with(".weight") || n.ends_with(".bias"))
        })
        .collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    Tensor::cat(
        &named
            .iter()
            .map(|(_, t)| t.flatten(0, -1).to_kind(Kind::Double))
            .collect::<Vec<_>>(),
        0,
    )
}

fn distance(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).norm().double_value(&[])
}

/// Rank `rank` of 2 in this process (rank 0 hosts the store).
fn local_group(rank: usize, port: u16, prefix: &str) -> Group {
    let rv = Rendezvous {
        addr: "127.0.0.1".into(),
        port,
        rank,
        world: 2,
        local_rank: rank,
        host_store: rank == 0,
        prefix: prefix.into(),
        timeout: Duration::from_secs(60),
    };
    Group::join(&rv, Backend::Gloo).unwrap()
}

/// One SGD step (momentum 0.9, lr 0.1) of a linear least-squares model from `w0` on (x, y),
/// its gradients averaged over `group` if given; the weights after it.
fn sgd_step(x: &Tensor, y: &Tensor, w0: &Tensor, group: Option<&Group>) -> Tensor {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let w = vs.root().var_copy("w", w0);
    let mut opt = gmpq::train::Sgd::new(gmpq::train::Sgd::trainable(&vs), 0.9, 0.0);
    opt.zero_grad();
    (x.matmul(&w.tr()) - y)
        .square()
        .mean(Kind::Float)
        .backward();
    if let Some(g) = group {
        opt.average_grads(g).unwrap();
    }
    opt.step(0.1);
    w.detach().copy()
}

#[test]
fn collectives_agree_and_a_divergence_is_caught() {
    let port = free_port();
    let handles: Vec<_> = (0..2)
        .map(|r| {
            std::thread::spawn(move || {
                let g = local_group(r, port, "test/");
                let x = Tensor::from_slice(&[1.0f32 + r as f32, 10.0 * r as f32]);
                g.all_reduce_sum(&x).unwrap();
                let sum = Vec::<f32>::try_from(&x).unwrap();
                let m = Tensor::from_slice(&[r as f32, 4.0]);
                g.all_reduce_mean(&m).unwrap();
                let mean = Vec::<f32>::try_from(&m).unwrap();
                let mx = Tensor::from_slice(&[r as f32, -(r as f32)]);
                g.all_reduce_max(&mx).unwrap();
                let max = Vec::<f32>::try_from(&mx).unwrap();
                // A non-contiguous (transposed) tensor is broadcast in place too.
                let b = (Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3])
                    * (r as f64 + 1.0))
                    .tr();
                g.broadcast(&b, 0).unwrap();
                let bcast = Vec::<f32>::try_from(b.contiguous().flatten(0, -1)).unwrap();
                g.barrier().unwrap();
                // The agreement check passes on equal stores and names a differing variable.
                let vs = tch::nn::VarStore::new(Device::Cpu);
                let w = vs.root().zeros("w", &[3]);
                g.check_same_var_store(&vs, "equal").unwrap();
                if r == 1 {
                    tch::no_grad(|| {
                        let _ = w.shallow_clone().fill_(1e-7);
                    });
                }
                let diverged = g.check_same_var_store(&vs, "after a change").unwrap_err();
                (sum, mean, max, bcast, diverged.to_string())
            })
        })
        .collect();
    for h in handles {
        let (sum, mean, max, bcast, diverged) = h.join().unwrap();
        assert_eq!(sum, vec![3.0, 10.0]);
        assert_eq!(mean, vec![0.5, 4.0]);
        assert_eq!(max, vec![1.0, 0.0]);
        assert_eq!(bcast, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert!(diverged.contains("different values of w"), "{diverged}");
    }
}

#[test]
fn averaged_half_batch_gradients_equal_the_full_batch_gradient() {
    // The optimizer's one-bucket all-reduce: the mean of the two halves' mean gradients is the
    // mean gradient of the whole batch (no batch norm here, so nothing else differs).
    tch::manual_seed(3);
    let x = Tensor::randn([8, 5], (Kind::Float, Device::Cpu));
    let y = Tensor::randn([8, 2], (Kind::Float, Device::Cpu));
    let w0 = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
    let full = sgd_step(&x, &y, &w0, None);
    let port = free_port();
    let halves: Vec<Tensor> = (0..2)
        .map(|r| {
            let (x, y, w0) = (x.narrow(0, 4 * r, 4), y.narrow(0, 4 * r, 4), w0.copy());
            std::thread::spawn(move || {
                let g = local_group(r as usize, port, "grad/");
                sgd_step(&x, &y, &w0, Some(&g))
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    assert!(halves[0].equal(&halves[1]), "the ranks stepped differently");
    let diff = (&halves[0] - &full).abs().max().double_value(&[]);
    assert!(diff < 1e-6, "2 × B/2 differs from 1 × B by {diff}");
}

fn finetune_args(teacher: &Path, out: &Path, limit: usize, epochs: usize) -> Vec<String> {
    let mut a = strings(&["--threads", "1", "finetune", "--init"]);
    a.push(teacher.display().to_string());
    a.extend(strings(&[
        "--uniform",
        "w4a4",
        "--data",
        "bundled:fashion-mnist",
        "--test-limit",
        "200",
        "--batch-size",
        "64",
        "--lr",
        "0.01",
        "--seed",
        "0",
        "--limit",
    ]));
    a.push(limit.to_string());
    a.push("--epochs".into());
    a.push(epochs.to_string());
    a.push("--out".into());
    a.push(out.display().to_string());
    a
}

fn with_numerics(mut args: Vec<String>, numerics: &str) -> Vec<String> {
    args.extend(strings(&["--numerics", numerics]));
    args
}

#[test]
fn two_ranks_follow_one_rank_in_finetuning_and_resume_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::fmnist_teacher(&dir.path().join("fp"), 600);
    let ck = |d: &PathBuf| d.join("last.safetensors");

    // One step of integer fine-tuning (batch norm frozen from the first step, so no batch
    // statistics): 2 ranks × 32 images compute exactly what 1 rank × 64 does, up to the
    // order of float sums.
    let one_step = |out: &PathBuf| with_numerics(finetune_args(&teacher, out, 64, 1), "integer");
    let (one, two) = (dir.path().join("step1"), dir.path().join("step2"));
    let o = common::gmpq().args(one_step(&one)).output().unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    let outputs = launch(2, &one_step(&two));
    // Only rank 0 reports.
    assert!(
        outputs[1].stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&outputs[1].stdout)
    );
    assert!(!outputs[0].stdout.is_empty());
    // What is exact: the parameters after the step, up to the order of float sums (the
    // gradient of 64 images summed as 2 × 32), far below 1e-6 relative on any CPU.
    let (p1, p2) = (parameters(&ck(&one)), parameters(&ck(&two)));
    let rel = distance(&p1, &p2) / p1.norm().double_value(&[]);
    assert!(rel < 1e-6, "parameters differ by {rel} (relative)");
    // What is not: the losses pass through re-quantizations, where a float sum in another
    // order (batches of 32 pick other conv kernels than 64, and another CPU others again)
    // can land a value on the other side of a rounding tie and move it one level. One such
    // flip moves one image's loss by a few hundredths, the mean over 200 test images (or 64
    // training images) by under 1e-3 relative; ranks that computed different images or
    // parameters differ by several per cent. (Equal to 1e-5 on an Intel Xeon with VNNI;
    // over 1e-5 on an AMD EPYC without it.)
    let h1 = Checkpoint::load(&ck(&one)).unwrap().meta.history;
    let h2 = Checkpoint::load(&ck(&two)).unwrap().meta.history;
    for (what, a, b) in [
        ("train loss", h1[0].train_loss, h2[0].train_loss),
        ("test loss", h1[0].test_loss, h2[0].test_loss),
    ] {
        assert!(
            (a - b).abs() < 2e-3 * a,
            "{what}: {a} (1 rank) against {b} (2 ranks)"
        );
    }

    // Two epochs of fake-quant fine-tuning (float batch norm throughout): each rank's batch
    // statistics come from 32 images instead of 64, so the curves differ by that noise only.
    // Measured on this setting: 1.883/1.565 against 1.910/1.605 (within 3 %); another seed
    // gives 1.898/1.518.
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let args = |out: &PathBuf| with_numerics(finetune_args(&teacher, out, 512, 2), "fake-quant");
    let o = common::gmpq().args(args(&one)).output().unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    launch(2, &args(&two));
    let h1 = Checkpoint::load(&ck(&one)).unwrap().meta.history;
    let h2 = Checkpoint::load(&ck(&two)).unwrap().meta.history;
    assert_eq!(h2.len(), 2);
    for (a, b) in h1.iter().zip(&h2) {
        assert!(
            (a.train_loss - b.train_loss).abs() < 0.1 * a.train_loss,
            "epoch {}: train loss {} (1 rank) against {} (2 ranks)",
            a.epoch,
            a.train_loss,
            b.train_loss
        );
    }

    // Killed after its first epoch's checkpoint, restarted with --resume: it finishes and
    // ends where the uninterrupted 2-rank run did.
    let killed = dir.path().join("killed");
    let args = args(&killed);
    let port = free_port();
    let mut children: Vec<Child> = (0..2)
        .map(|r| {
            rank(r, 2, port, &args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let started = Instant::now();
    let json = killed.join("last.json");
    while !json.is_file() {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    let kept = Checkpoint::load(&ck(&killed)).unwrap().meta.epoch;
    assert_eq!(kept, 1, "the kill came after epoch {kept}");
    let mut resumed = args.clone();
    resumed.push("--resume".into());
    launch(2, &resumed);
    let meta = Checkpoint::load(&ck(&killed)).unwrap().meta;
    assert_eq!(meta.epoch, 2);
    assert!(
        parameters(&ck(&killed)).equal(&parameters(&ck(&two))),
        "the resumed run ended elsewhere than the uninterrupted one"
    );
}

#[test]
fn world_size_one_runs_exactly_as_a_single_process() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::fmnist_teacher(&dir.path().join("fp"), 300);
    let plain = dir.path().join("plain");
    let o = common::gmpq()
        .args(finetune_args(&teacher, &plain, 512, 1))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    let one = dir.path().join("world1");
    launch(1, &finetune_args(&teacher, &one, 512, 1));
    let a = Checkpoint::load(&plain.join("last.safetensors")).unwrap();
    let b = Checkpoint::load(&one.join("last.safetensors")).unwrap();
    for (name, t) in a.model_tensors() {
        let u = b
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert!(t.equal(u), "{name} differs");
    }
    assert_eq!(
        serde_json::to_value(a.meta.history.last().unwrap().test_loss).unwrap(),
        serde_json::to_value(b.meta.history.last().unwrap().test_loss).unwrap()
    );
}

#[test]
fn a_peer_that_never_comes_ends_the_run_with_one_line() {
    let started = Instant::now();
    let o = rank(0, 2, free_port(), &strings(&["info"]))
        .env("GMPQ_DIST_TIMEOUT", "3")
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(!o.status.success());
    let err = common::stderr(&o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("error: rank 0 of 2: could not join the process group"),
        "{err}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    // Variables that contradict each other are refused before any waiting.
    let o = common::gmpq()
        .arg("info")
        .env("RANK", "2")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(common::stderr(&o).contains("rank 2 is not in a world of 2"));
    // A command that does not run data-parallel refuses to run as several ranks.
    let o = rank(
        0,
        2,
        free_port(),
        &strings(&["bops", "--model", "resnet20", "--uniform", "w4a4"]),
    )
    .output()
    .unwrap();
    assert!(!o.status.success());
    assert!(
        common::stderr(&o).contains("runs as one process"),
        "{}",
        common::stderr(&o)
    );
}

#[test]
fn two_ranks_follow_one_rank_in_the_search() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::fmnist_teacher(&dir.path().join("fp"), 600);
    let args = |out: &Path| -> Vec<String> {
        let mut a = strings(&["--threads", "1", "search", "--teacher"]);
        a.push(teacher.display().to_string());
        a.extend(strings(&[
            "--data",
            "bundled:fashion-mnist",
            "--target-compression",
            "64",
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--limit",
            "512",
            "--seed",
            "0",
        ]));
        a.push("--out".into());
        a.push(out.display().to_string());
        a
    };
    let one = dir.path().join("one");
    let o = common::gmpq().args(args(&one)).output().unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    let two = dir.path().join("two");
    launch(2, &args(&two));
    // The supernet has float batch norm, so the curves differ by half-batch statistics
    // only: cross-entropy within 15 % per epoch (measured 5–6 %), and the expected BOPs, which
    // the budget controller steers from the averaged α gradients, within 2 %.
    let log = |d: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("search-log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    for (a, b) in log(&one).iter().zip(&log(&two)) {
        let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
        let (ce1, ce2) = (f(a, "ce"), f(b, "ce"));
        assert!(
            (ce1 - ce2).abs() < 0.15 * ce1,
            "CE {ce1} (1 rank) against {ce2} (2 ranks)"
        );
        let (e1, e2) = (f(a, "expected_bops"), f(b, "expected_bops"));
        assert!((e1 - e2).abs() < 0.02 * e1, "E[BOPs] {e1} against {e2}");
        assert_eq!(f(a, "images"), f(b, "images"));
    }
    // Only rank 0 wrote the folder's files (one log line per epoch).
    let log = std::fs::read_to_string(two.join("search-log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");
}

#[test]
fn torchrun_launches_two_ranks() {
    let torchrun = PathBuf::from(env!("GMPQ_TORCHRUN"));
    assert!(
        torchrun.is_file(),
        "{} not found: scripts/setup.sh installs torch (with torchrun) into .venv",
        torchrun.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::fmnist_teacher(&dir.path().join("fp"), 300);
    let out = dir.path().join("ft");
    let mut args = strings(&["--nproc-per-node", "2", "--master-port"]);
    args.push(free_port().to_string());
    args.push("--no-python".into());
    args.push(env!("CARGO_BIN_EXE_gmpq").into());
    args.extend(finetune_args(&teacher, &out, 512, 1));
    let o = Command::new(&torchrun)
        .args(&args)
        .env("GMPQ_LOG", "info")
        .output()
        .unwrap();
    let err = common::stderr(&o);
    assert!(o.status.success(), "{err}");
    for r in 0..2 {
        assert!(err.contains(&format!("rank {r} of 2 (Gloo")), "{err}");
    }
    assert_eq!(
        Checkpoint::load(&out.join("last.safetensors"))
            .unwrap()
            .meta
            .epoch,
        1
    );
}

#[test]
fn a_stop_signal_ends_a_run_cleanly_and_it_resumes() {
    // What Slurm sends before a job's time limit (SIGUSR1 via the batch script, SIGTERM on
    // preemption): the run stops at the next step, keeps its last finished epoch, and the
    // same command with --resume finishes it.
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::fmnist_teacher(&dir.path().join("fp"), 300);
    let out = dir.path().join("ft");
    let args = finetune_args(&teacher, &out, 1024, 3);
    let child = common::gmpq()
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !out.join("last.json").is_file() {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signals our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success());
    let err = common::stderr(&o);
    assert!(err.contains("stopped by SIGTERM"), "{err}");
    assert!(
        err.contains("keeps epoch 1") || err.contains("keeps epoch 2"),
        "{err}"
    );
    let mut resumed = args.clone();
    resumed.push("--resume".into());
    let o = common::gmpq().args(&resumed).output().unwrap();
    assert!(o.status.success(), "{}", common::stderr(&o));
    assert_eq!(
        Checkpoint::load(&out.join("last.safetensors"))
            .unwrap()
            .meta
            .epoch,
        3
    );
}

/// Ranks started with different settings stop at once, each with one line naming the setting,
/// instead of a collective mismatch deep in Gloo (SIGABRT) or an epoch trained apart.
#[test]
fn ranks_started_with_different_settings_name_the_difference() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = common::fmnist_teacher(&dir.path().join("fp"), 600);
    let out = dir.path().join("ft");
    let port = free_port();
    let children: Vec<Child> = [64usize, 128]
        .iter()
        .enumerate()
        .map(|(r, &limit)| {
            rank(r, 2, port, &finetune_args(&teacher, &out, limit, 1))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (r, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        let err = common::stderr(&o);
        assert_eq!(o.status.code(), Some(1), "rank {r}: {err}");
        let limit = if r == 0 {
            "--limit 64 here"
        } else {
            "--limit 128 here"
        };
        assert!(
            err.contains("different settings") && err.contains(limit),
            "rank {r}: {err}"
        );
        assert!(
            err.trim().lines().count() <= 2,
            "rank {r}: more than one line: {err}"
        );
    }
}
