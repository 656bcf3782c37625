//! ipamd's background tasks under watch. None of them is meant to end: one that returns or
//! panics leaves ipamd serving without its pool manager, sweeper or readiness ticker, which is
//! worse than restarting. So the first one to end is reported (log, readiness) and ipamd exits
//! for the DaemonSet to restart it.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{Id, JoinSet};

#[derive(Default)]
pub struct Supervisor {
    tasks: JoinSet<()>,
    names: HashMap<Id, &'static str>,
}

impl Supervisor {
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let h = self.tasks.spawn(task);
        self.names.insert(h.id(), name);
    }

    /// Wait until a task ends; its name and how it ended. Pending forever with no tasks.
    pub async fn ended(&mut self) -> (&'static str, String) {
        match self.tasks.join_next_with_id().await {
            Some(Ok((id, ()))) => (self.name(id), "returned".into()),
            Some(Err(e)) => {
                let how = if e.is_panic() {
                    "panicked".to_string()
                } else {
                    format!("was cancelled ({e})")
                };
                (self.name(e.id()), how)
            }
            None => std::future::pending().await,
        }
    }

    fn name(&self, id: Id) -> &'static str {
        self.names.get(&id).copied().unwrap_or("unnamed task")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_the_task_that_ended() {
        let mut s = Supervisor::default();
        s.spawn("forever", std::future::pending());
        s.spawn("short", async {});
        assert_eq!(s.ended().await, ("short", "returned".to_string()));
        let mut s = Supervisor::default();
        s.spawn("forever", std::future::pending());
        s.spawn("broken", async {
            let v: Vec<u8> = Vec::new();
            // An out-of-bounds index, the kind of bug supervision exists for.
            let _ = v[usize::from(v.is_empty())];
        });
        assert_eq!(s.ended().await, ("broken", "panicked".to_string()));
    }
}
