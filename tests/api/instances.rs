use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::helpers::*;

pub struct Instance(Child);

impl Instance {
    pub fn start(env: &TestEnv) -> Instance {
        Self::start_with(env, &[], Stdio::null())
    }

    /// With extra `APP__*` variables, and the service's bunyan log going to `stdout`.
    pub fn start_with(env: &TestEnv, extra_env: &[(String, String)], stdout: Stdio) -> Instance {
        let child = Command::new(env!("CARGO_BIN_EXE_webhook-delivery"))
            .arg("serve")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .envs(env.settings_env())
            .envs(extra_env.iter().cloned())
            .stdout(stdout)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("binary starts");
        Instance(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn sigkill(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    pub fn sigterm(mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .unwrap();
        self.0.wait().unwrap()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_never_send_the_same_delivery_at_once_and_survive_a_kill() {
    let env = TestEnv::new(4).await;
    let answer_after = Duration::from_millis(1000);
    let receiver = ScriptedReceiver::start_with_delay(&[200], answer_after).await;
    env.add_broker("b1", &receiver.server.uri()).await;
    let events = 96;
    for i in 0..events {
        let load = format!("L{}", i % 12);
        if i < 12 {
            env.subscribe("b1", &load).await;
        }
        env.produce_event(Some(&format!("e{i}")), &load, &format!("s{i}"))
            .await;
    }

    let first = Instance::start(&env);
    let second = Instance::start(&env);
    assert!(
        eventually(Duration::from_secs(60), || async {
            env.count("SELECT count(*) FROM deliveries WHERE state = 'delivered'")
                .await
                >= 15
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(30), || async {
            env.count(
                "SELECT count(DISTINCT owner_id) FROM partition_leases WHERE expires_at > now()",
            )
            .await
                == 2
        })
        .await,
        "both instances own partitions before one is killed"
    );
    first.sigkill();
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            events as i64,
            Duration::from_secs(120)
        )
        .await,
        "the survivor takes over the dead instance's partitions and delivers everything"
    );
    assert!(second.sigterm().success());

    let mut by_id: HashMap<String, Vec<std::time::Instant>> = HashMap::new();
    for (at, id) in receiver.requests() {
        by_id.entry(id).or_default().push(at);
    }
    assert_eq!(by_id.len(), events, "no event lost");
    for (id, arrivals) in &by_id {
        for pair in arrivals.windows(2) {
            assert!(
                pair[1] - pair[0] >= answer_after,
                "{id} was sent again while an earlier attempt was still in flight"
            );
        }
    }
    let resent = by_id.values().filter(|a| a.len() > 1).count();
    assert!(
        resent <= 16,
        "only deliveries in flight at the kill may be sent again (at most the in-flight limit): {resent}"
    );
}
