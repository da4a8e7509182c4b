//! In-memory AWS for the steps' unit tests: launch template versions, groups and their refreshes,
//! stacks, images, parameters and keys (one impl per capability of `aws`), with a record of every
//! change a step made. Only behaviour the steps
//! rely on is modelled; the real APIs are covered end to end against the emulator.

use std::collections::HashMap;
use std::sync::Mutex;

use runtime::StepError;

use crate::aws::{
    Group, Groups, Image, Images, Instance, Keys, LaunchSource, ListedVersion, MARKS_PATH,
    MarkParameters, ParamValue, Parameters, Records, Refresh, RefreshRequest, Stack, Stacks,
    StoredRecord, TemplateVersion, Templates, parameter_name,
};

#[derive(Default)]
pub struct FakeAws {
    pub groups: Mutex<HashMap<String, Group>>,
    /// Template id -> versions (number, image, default).
    pub templates: Mutex<HashMap<String, Vec<TemplateVersion>>>,
    pub refreshes: Mutex<HashMap<String, Vec<Refresh>>>,
    pub instance_amis: Mutex<HashMap<String, String>>,
    /// Launch times of instances (none: unknown).
    pub instance_launched: Mutex<HashMap<String, chrono::DateTime<chrono::Utc>>>,
    pub stacks: Mutex<HashMap<String, Stack>>,
    pub images: Mutex<HashMap<String, Image>>,
    /// Image Builder image ARN -> the AMI tagged with it.
    pub built_by: Mutex<HashMap<String, String>>,
    pub params: Mutex<HashMap<String, ParamValue>>,
    /// Earlier values of a parameter, oldest first (its history is these, then its value).
    pub earlier_values: Mutex<HashMap<String, Vec<String>>>,
    /// Every change a step asked for, in order (`create_version lt-1 2 ami-..`, ...).
    pub changes: Mutex<Vec<String>>,
    pub started: Mutex<Vec<(String, RefreshRequest)>>,
    /// How many template reads (one version, or one listing of every template) steps made.
    pub template_reads: std::sync::atomic::AtomicUsize,
    /// How many group reads (`get`, `with_tag_value`, `refreshes`) steps made.
    pub group_reads: std::sync::atomic::AtomicUsize,
    /// How many listings of every group steps made (`list`).
    pub listings: std::sync::atomic::AtomicUsize,
    /// How many instances steps read (`instances`).
    pub instance_reads: std::sync::atomic::AtomicUsize,
    /// How many parameter histories steps read (`history`).
    pub history_reads: std::sync::atomic::AtomicUsize,
    /// Make `ensure_grant` answer AccessDenied.
    pub refuse_grants: Mutex<bool>,
    /// Hold every instance read until notified (a test's view of a step in the middle of it).
    pub hold_instance_reads: Mutex<Option<std::sync::Arc<tokio::sync::Notify>>>,
    /// amiflow's records (`aws::Records`), by name.
    pub records: Mutex<std::collections::BTreeMap<String, String>>,
}

impl FakeAws {
    pub fn group(&self, name: &str, template: &str, version: &str, ami: &str, instances: usize) {
        let ids: Vec<String> = (0..instances).map(|i| format!("i-{name}-{i}")).collect();
        for id in &ids {
            self.instance_amis
                .lock()
                .unwrap()
                .insert(id.clone(), ami.to_owned());
        }
        self.groups.lock().unwrap().insert(
            name.to_owned(),
            Group {
                name: name.to_owned(),
                source: LaunchSource::Template {
                    id: template.to_owned(),
                    version: version.to_owned(),
                    mixed: None,
                },
                tags: HashMap::new(),
                instance_ids: ids,
                launched_from: HashMap::new(),
            },
        );
    }

    /// Auto Scaling records that every instance of `group` was launched from `template` as
    /// `version` (without this, the fake records nothing: every instance is read).
    pub fn launched_from(&self, group: &str, template: &str, version: &str) {
        let mut groups = self.groups.lock().unwrap();
        let g = groups.get_mut(group).unwrap();
        g.launched_from = g
            .instance_ids
            .iter()
            .map(|id| {
                (
                    id.clone(),
                    crate::aws::LaunchedFrom {
                        template_id: template.to_owned(),
                        version: version.to_owned(),
                    },
                )
            })
            .collect();
    }

    /// The golden parameter `name` holds `value`, after `earlier` (oldest first).
    pub fn golden(&self, name: &str, value: &str, earlier: &[&str]) {
        self.params.lock().unwrap().insert(
            name.to_owned(),
            ParamValue {
                value: value.to_owned(),
                version: earlier.len() as i64 + 1,
                data_type: "aws:ec2:image".into(),
            },
        );
        self.earlier_values.lock().unwrap().insert(
            name.to_owned(),
            earlier.iter().map(|e| (*e).to_owned()).collect(),
        );
    }

    pub fn template(&self, id: &str, images: &[&str], default: i64) {
        let versions = images
            .iter()
            .enumerate()
            .map(|(i, image)| TemplateVersion {
                number: i as i64 + 1,
                image_id: (*image).to_owned(),
                is_default: i as i64 + 1 == default,
                description: String::new(),
            })
            .collect();
        self.templates
            .lock()
            .unwrap()
            .insert(id.to_owned(), versions);
    }

    /// End the group's newest refresh successfully, as AWS does: the group takes the refresh's
    /// desired version (if it had one) and every instance is replaced from what the group's
    /// template version resolves to now.
    pub fn succeed(&self, group: &str) {
        let desired = {
            let mut refreshes = self.refreshes.lock().unwrap();
            let newest = &mut refreshes.get_mut(group).unwrap()[0];
            newest.status = "Successful".into();
            newest.desired_version.clone()
        };
        let mut groups = self.groups.lock().unwrap();
        let g = groups.get_mut(group).unwrap();
        let LaunchSource::Template { id, version, .. } = &mut g.source else {
            return;
        };
        if let Some(desired) = desired {
            *version = desired;
        }
        let templates = self.templates.lock().unwrap();
        let versions = &templates[id.as_str()];
        let resolved = match version.as_str() {
            "$Latest" => versions.last(),
            "$Default" => versions.iter().find(|v| v.is_default),
            n => versions.iter().find(|v| v.number.to_string() == n),
        };
        let image = resolved.map(|v| v.image_id.clone()).unwrap_or_default();
        let mut amis = self.instance_amis.lock().unwrap();
        for id in &g.instance_ids {
            amis.insert(id.clone(), image.clone());
        }
    }

    pub fn changes(&self) -> Vec<String> {
        self.changes.lock().unwrap().clone()
    }

    fn read(&self) {
        self.group_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn record(&self, change: String) {
        self.changes.lock().unwrap().push(change);
    }
}

impl Templates for FakeAws {
    async fn template_version(
        &self,
        template: &str,
        version: &str,
    ) -> Result<Option<TemplateVersion>, StepError> {
        self.template_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let templates = self.templates.lock().unwrap();
        let Some(versions) = templates.get(template) else {
            return Ok(None);
        };
        Ok(match version {
            "$Latest" => versions.last().cloned(),
            "$Default" => versions.iter().find(|v| v.is_default).cloned(),
            n => versions
                .iter()
                .find(|v| n.parse::<i64>() == Ok(v.number))
                .cloned(),
        })
    }

    /// One page holds every template (the fake has no paging).
    async fn every_version(
        &self,
        which: &str,
        _max_calls: usize,
    ) -> Result<Vec<ListedVersion>, StepError> {
        self.template_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let templates = self.templates.lock().unwrap();
        Ok(templates
            .iter()
            .filter_map(|(id, versions)| {
                let version = match which {
                    "$Latest" => versions.last(),
                    _ => versions.iter().find(|v| v.is_default),
                }?;
                Some(ListedVersion {
                    template_id: id.clone(),
                    template_name: format!("{id}-name"),
                    version: version.clone(),
                })
            })
            .collect())
    }

    async fn version_with_image(
        &self,
        template: &str,
        ami: &str,
    ) -> Result<Option<TemplateVersion>, StepError> {
        Ok(self.templates.lock().unwrap().get(template).and_then(|vs| {
            vs.iter()
                .filter(|v| v.image_id == ami)
                .max_by_key(|v| v.number)
                .cloned()
        }))
    }

    async fn create_version(
        &self,
        template: &str,
        source: i64,
        ami: &str,
        description: &str,
    ) -> Result<i64, StepError> {
        self.record(format!("create_version {template} from {source} {ami}"));
        let mut templates = self.templates.lock().unwrap();
        let versions = templates
            .get_mut(template)
            .ok_or_else(|| StepError::Permanent(format!("no template {template}")))?;
        let number = versions.len() as i64 + 1;
        versions.push(TemplateVersion {
            number,
            image_id: ami.to_owned(),
            is_default: false,
            description: description.to_owned(),
        });
        Ok(number)
    }

    async fn set_default_version(&self, template: &str, version: i64) -> Result<(), StepError> {
        self.record(format!("set_default_version {template} {version}"));
        if let Some(vs) = self.templates.lock().unwrap().get_mut(template) {
            for v in vs {
                v.is_default = v.number == version;
            }
        }
        Ok(())
    }
}

impl Groups for FakeAws {
    async fn list(&self) -> Result<Vec<Group>, StepError> {
        self.listings
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut groups: Vec<Group> = self.groups.lock().unwrap().values().cloned().collect();
        groups.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(groups)
    }

    async fn get(&self, name: &str) -> Result<Option<Group>, StepError> {
        self.read();
        Ok(self.groups.lock().unwrap().get(name).cloned())
    }

    async fn with_tag_value(&self, key: &str, value: &str) -> Result<Vec<Group>, StepError> {
        self.read();
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|g| g.tags.get(key).is_some_and(|v| v == value))
            .collect())
    }

    async fn set_tags(&self, group: &str, tags: &[(&str, &str)]) -> Result<(), StepError> {
        for (key, value) in tags {
            self.record(format!("set_tag {group} {key}={value}"));
            if let Some(g) = self.groups.lock().unwrap().get_mut(group) {
                g.tags.insert((*key).to_owned(), (*value).to_owned());
            }
        }
        Ok(())
    }

    async fn launch_configuration_image(&self, _name: &str) -> Result<Option<String>, StepError> {
        Ok(None)
    }

    async fn refreshes(&self, group: &str) -> Result<Vec<Refresh>, StepError> {
        self.read();
        Ok(self
            .refreshes
            .lock()
            .unwrap()
            .get(group)
            .cloned()
            .unwrap_or_default())
    }

    async fn cancel_refresh(&self, group: &str) -> Result<(), StepError> {
        self.record(format!("cancel_refresh {group}"));
        if let Some(newest) = self
            .refreshes
            .lock()
            .unwrap()
            .get_mut(group)
            .and_then(|list| list.first_mut())
            .filter(|r| r.is_active())
        {
            newest.status = "Cancelling".into();
        }
        Ok(())
    }

    async fn start_refresh(
        &self,
        group: &str,
        request: &RefreshRequest,
    ) -> Result<String, StepError> {
        let mut refreshes = self.refreshes.lock().unwrap();
        let list = refreshes.entry(group.to_owned()).or_default();
        let id = format!("ir-{group}-{}", list.len() + 1);
        list.insert(
            0,
            Refresh {
                id: id.clone(),
                status: "Pending".into(),
                reason: String::new(),
                desired_version: request
                    .desired
                    .as_ref()
                    .and_then(crate::aws::desired_version),
            },
        );
        self.record(format!("start_refresh {group}"));
        self.started
            .lock()
            .unwrap()
            .push((group.to_owned(), request.clone()));
        Ok(id)
    }

    async fn instances(&self, ids: &[String]) -> Result<HashMap<String, Instance>, StepError> {
        let hold = self.hold_instance_reads.lock().unwrap().clone();
        if let Some(hold) = hold {
            hold.notified().await;
        }
        self.instance_reads
            .fetch_add(ids.len(), std::sync::atomic::Ordering::Relaxed);
        let amis = self.instance_amis.lock().unwrap();
        let launched = self.instance_launched.lock().unwrap();
        Ok(ids
            .iter()
            .filter_map(|id| {
                amis.get(id).map(|a| {
                    (
                        id.clone(),
                        Instance {
                            image: a.clone(),
                            launched_at: launched.get(id).copied(),
                        },
                    )
                })
            })
            .collect())
    }
}

impl Stacks for FakeAws {
    async fn describe(&self, name: &str) -> Result<Option<Stack>, StepError> {
        Ok(self.stacks.lock().unwrap().get(name).cloned())
    }

    async fn update_with_previous(&self, stack: &Stack) -> Result<bool, StepError> {
        self.record(format!("update_stack {}", stack.name));
        Ok(true)
    }
}

impl Images for FakeAws {
    async fn describe(&self, ami: &str) -> Result<Option<Image>, StepError> {
        Ok(self.images.lock().unwrap().get(ami).cloned())
    }

    async fn built_by(&self, image_builder_arn: &str) -> Result<Option<Image>, StepError> {
        Ok(self
            .built_by
            .lock()
            .unwrap()
            .get(image_builder_arn)
            .and_then(|ami| self.images.lock().unwrap().get(ami).cloned()))
    }

    async fn launch_permissions(&self, _ami: &str) -> Result<Vec<String>, StepError> {
        Ok(Vec::new())
    }

    async fn add_launch_permission(&self, ami: &str, account: &str) -> Result<(), StepError> {
        self.record(format!("add_launch_permission {ami} {account}"));
        Ok(())
    }

    async fn snapshot_permissions(&self, _snapshot: &str) -> Result<Vec<String>, StepError> {
        Ok(Vec::new())
    }

    async fn add_snapshot_permission(
        &self,
        snapshot: &str,
        account: &str,
    ) -> Result<(), StepError> {
        self.record(format!("add_snapshot_permission {snapshot} {account}"));
        Ok(())
    }
}

impl Parameters for FakeAws {
    async fn get(&self, name: &str) -> Result<Option<ParamValue>, StepError> {
        Ok(self.params.lock().unwrap().get(name).cloned())
    }

    async fn put_image(&self, name: &str, ami: &str) -> Result<i64, StepError> {
        self.record(format!("put_parameter {name} {ami}"));
        let mut params = self.params.lock().unwrap();
        let version = params.get(name).map_or(1, |p| p.version + 1);
        // Parameter Store keeps every value: the one overwritten joins the history.
        if let Some(before) = params.get(name) {
            self.earlier_values
                .lock()
                .unwrap()
                .entry(name.to_owned())
                .or_default()
                .push(before.value.clone());
        }
        params.insert(
            name.to_owned(),
            ParamValue {
                value: ami.to_owned(),
                version,
                data_type: "aws:ec2:image".into(),
            },
        );
        Ok(version)
    }

    async fn history(&self, name: &str) -> Result<Vec<String>, StepError> {
        self.history_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut values = self
            .earlier_values
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .unwrap_or_default();
        values.extend(
            self.params
                .lock()
                .unwrap()
                .get(name)
                .map(|p| p.value.clone()),
        );
        Ok(values)
    }
}

impl Records for FakeAws {
    async fn read_record(&self, name: &str) -> Result<Option<String>, StepError> {
        Ok(self.records.lock().unwrap().get(name).cloned())
    }

    async fn list_records(&self, path: &str) -> Result<Vec<StoredRecord>, StepError> {
        let prefix = format!("{}/", path.trim_end_matches('/'));
        Ok(self
            .records
            .lock()
            .unwrap()
            .iter()
            .filter(|(name, _)| name.starts_with(&prefix))
            .map(|(name, value)| StoredRecord {
                name: name.clone(),
                value: value.clone(),
                written_by: None,
            })
            .collect())
    }

    async fn write_record(&self, name: &str, value: &str) -> Result<(), StepError> {
        self.record(format!("put_record {name}"));
        self.records
            .lock()
            .unwrap()
            .insert(name.to_owned(), value.to_owned());
        Ok(())
    }

    async fn remove_record(&self, name: &str) -> Result<(), StepError> {
        self.record(format!("delete_record {name}"));
        self.records.lock().unwrap().remove(name);
        Ok(())
    }
}

impl MarkParameters for FakeAws {
    async fn mark_value(&self, group: &str) -> Result<Option<String>, StepError> {
        Ok(self
            .params
            .lock()
            .unwrap()
            .get(&parameter_name(group))
            .map(|p| p.value.clone()))
    }

    async fn put_mark_value(&self, group: &str, value: &str) -> Result<(), StepError> {
        let name = parameter_name(group);
        self.record(format!("put_parameter {name} {value}"));
        let mut params = self.params.lock().unwrap();
        let version = params.get(&name).map_or(1, |p| p.version + 1);
        params.insert(
            name,
            ParamValue {
                value: value.to_owned(),
                version,
                data_type: "text".into(),
            },
        );
        Ok(())
    }

    async fn mark_values(&self) -> Result<Vec<String>, StepError> {
        self.read();
        let prefix = format!("{MARKS_PATH}/");
        Ok(self
            .params
            .lock()
            .unwrap()
            .iter()
            .filter(|(name, _)| name.starts_with(&prefix))
            .map(|(_, p)| p.value.clone())
            .collect())
    }
}

impl Keys for FakeAws {
    async fn ensure_grant(&self, key: &str, grantee: &str, name: &str) -> Result<(), StepError> {
        if *self.refuse_grants.lock().unwrap() {
            return Err(StepError::Permanent(format!(
                "kms:CreateGrant: AccessDeniedException on {key}"
            )));
        }
        self.record(format!("grant {key} {grantee} {name}"));
        Ok(())
    }
}
