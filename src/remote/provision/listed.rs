//! The `static` provisioner: servers someone else runs, given as a list of URLs.

use std::sync::Mutex;

use super::{ProvisionError, Provisioner, ServerEndpoint};

/// Hands out a fixed list of servers, each to at most one backend place at a time. Nothing is
/// started or stopped: "terminate" gives a server back to the list, and a server that went
/// away and came back is handed out again.
pub struct ListedProvisioner {
    servers: Vec<ServerEndpoint>,
    in_use: Mutex<Vec<bool>>,
}

impl ListedProvisioner {
    /// The servers at `urls` (trailing slashes removed), all with `token`; each is named
    /// `listed-N` after its place in the list.
    pub fn new(urls: &[String], token: Option<String>) -> ListedProvisioner {
        let servers: Vec<ServerEndpoint> = urls
            .iter()
            .enumerate()
            .map(|(i, url)| ServerEndpoint {
                id: format!("listed-{i}"),
                url: url.trim_end_matches('/').to_string(),
                token: token.clone(),
            })
            .collect();
        let in_use = Mutex::new(vec![false; servers.len()]);
        ListedProvisioner { servers, in_use }
    }

    fn in_use(&self) -> std::sync::MutexGuard<'_, Vec<bool>> {
        self.in_use.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl Provisioner for ListedProvisioner {
    fn name(&self) -> &str {
        "static"
    }

    fn limit(&self) -> Option<usize> {
        Some(self.servers.len())
    }

    fn owns_servers(&self) -> bool {
        false
    }

    async fn provision(&self, count: usize) -> Result<Vec<ServerEndpoint>, ProvisionError> {
        let mut in_use = self.in_use();
        let free: Vec<usize> = (0..self.servers.len()).filter(|&i| !in_use[i]).take(count).collect();
        if free.len() < count {
            return Err(ProvisionError::NoMoreServers {
                listed: self.servers.len(),
            });
        }
        Ok(free
            .into_iter()
            .map(|i| {
                in_use[i] = true;
                self.servers[i].clone()
            })
            .collect())
    }

    async fn terminate(&self, server: &ServerEndpoint) -> Result<(), ProvisionError> {
        let mut in_use = self.in_use();
        if let Some(i) = self.servers.iter().position(|s| s.id == server.id) {
            in_use[i] = false;
        }
        Ok(())
    }

    async fn shutdown(&self) -> Result<(), ProvisionError> {
        self.in_use().iter_mut().for_each(|used| *used = false);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hands_each_server_out_once_until_it_comes_back() {
        let listed = ListedProvisioner::new(&["http://a:1/".into(), "http://b:2".into()], Some("t".into()));
        let first = listed.provision(2).await.unwrap();
        assert_eq!(
            first.iter().map(|s| s.url.as_str()).collect::<Vec<_>>(),
            ["http://a:1", "http://b:2"]
        );
        let error = listed.provision(1).await.unwrap_err();
        assert!(error.to_string().contains("all 2 listed servers are in use"), "{error}");
        listed.terminate(&first[1]).await.unwrap();
        assert_eq!(listed.provision(1).await.unwrap()[0].id, "listed-1");
    }
}
