//! The account's slots for refreshes in flight, as this process knows them: the ledger that lets
//! waiting requests be answered without an AWS call, and the spread of their deferrals.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use events::{AsgRefreshFinished, AsgRefreshRequested, Detail, Outcome};
use runtime::{StepError, StepOutput};

use super::{RefreshSettings, defer};
use crate::aws::{Groups, MarkPlace, Marks, Parameters};
use crate::mark::{Mark, MarkState};

/// What this process knows of its account's refreshes in flight, and the slots it hands out.
///
/// The groups in flight are those AWS showed marked in progress at the last read (at most
/// [`REREAD`] old), corrected by what this process did since: the refreshes it started (whose
/// mark may not be written yet) and those it closed. A request holds a slot from the check until
/// its refresh starts or it gives up, so two requests can never both take the last slot, and the
/// requests that can only wait (a window opens on every stale group at once) are answered without
/// any AWS call. The slots are counted in this process; where several processes start refreshes
/// in one account (`AMIFLOW_ADMISSION=account`, the default under Lambda), each start is also
/// confirmed against a read of AWS's marks made just before it ([`RefreshSettings::confirm_start`]).
#[derive(Debug, Default)]
pub struct Admission {
    ledger: std::sync::Mutex<Ledger>,
    /// One read of AWS's marks at a time.
    reading: tokio::sync::Mutex<()>,
    /// The golden parameters' values this process has read (what a start checks a group's AMI
    /// against).
    pub(super) golden: super::start::GoldenValues,
}

#[derive(Debug, Default)]
struct Ledger {
    /// When the last read of AWS's marks began, and the groups it found in progress.
    read: Option<(Instant, BTreeSet<String>)>,
    /// Refreshes started (or taken over) here and not yet closed here, by group, with where the
    /// group keeps its mark.
    started: HashMap<String, (Mark, MarkPlace)>,
    /// When refreshes seen to end here ended, by group: a read begun before their close's mark was
    /// written does not count them.
    ended: HashMap<String, Instant>,
    /// Refreshes closed here (the mark written), by group, kept for [`CLOSED_KEPT`].
    closed: HashMap<String, Closed>,
    /// Groups holding a slot between the check and their start.
    reserved: BTreeSet<String>,
    /// Groups whose request was last told to wait, and when (kept until admitted, or an hour).
    waiting: HashMap<String, Instant>,
    /// Groups whose last refresh failed or rolled back, to which AMI, and when this process saw
    /// it end (`None`: AWS's marks at the last read), corrected by the closes made here since.
    failed: HashMap<String, (String, Option<Instant>)>,
    /// How many groups the account had at the last count (only a percentage tolerance needs it).
    group_count: Option<(Instant, usize)>,
}

#[derive(Debug, Clone)]
struct Closed {
    at: Instant,
    mark: Mark,
    outcome: Outcome,
    reason: String,
}

/// How old the read of AWS's marks may be. Between reads only this process's own starts and
/// closes change the count, and it knows those; the read catches what others did.
const REREAD: Duration = Duration::from_secs(30);
/// How long a close made here answers the request that comes back to poll it.
const CLOSED_KEPT: Duration = Duration::from_secs(3600);

impl Ledger {
    /// Note that the group's request was told to wait; how many requests wait now.
    fn wait(&mut self, group: &str) -> usize {
        self.waiting.insert(group.to_owned(), Instant::now());
        self.waiting.retain(|_, at| at.elapsed() < CLOSED_KEPT);
        self.waiting.len()
    }

    fn in_flight(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = match &self.read {
            // An end kept past the read is one the read does not show (see `reread`).
            Some((_, names)) => names
                .iter()
                .filter(|g| !self.ended.contains_key(*g))
                .cloned()
                .collect(),
            None => BTreeSet::new(),
        };
        names.extend(self.started.keys().cloned());
        names
    }
}

/// The answer of [`Admission::admit`].
pub(super) enum Admit<'a> {
    /// The group's refresh is in flight already: its request comes back to poll it.
    InFlight,
    /// A free slot, held for the group until the guard is dropped or its refresh starts.
    Slot(Slot<'a>),
    /// Every slot is taken (by `taken` refreshes and requests about to start one), and `waiting`
    /// requests wait for one.
    Full { taken: usize, waiting: usize },
}

pub(super) struct Slot<'a> {
    admission: &'a Admission,
    group: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.admission.ledger().reserved.remove(&self.group);
    }
}

impl Admission {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_is_fresh(&self) -> bool {
        self.ledger()
            .read
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < REREAD)
    }

    /// Read AWS's in-progress marks if the last read is too old, or with `now` at once (one
    /// reader at a time).
    async fn reread(
        &self,
        marks: &Marks<'_, impl Groups, impl Parameters>,
        now: bool,
    ) -> Result<(), StepError> {
        if !now && self.read_is_fresh() {
            return Ok(());
        }
        let _one = self.reading.lock().await;
        if !now && self.read_is_fresh() {
            return Ok(());
        }
        let began = Instant::now();
        // The failures a stage's tolerance counts come with the same periodic read.
        let states = marks.states().await?;
        let names = states.running;
        let mut failed: HashMap<String, (String, Option<Instant>)> = states
            .failed
            .into_iter()
            .map(|(group, ami)| (group, (ami, None)))
            .collect();
        let mut guard = self.ledger();
        let ledger = &mut *guard;
        ledger.read = Some((began, names));
        // A refresh that ended here is in the read only if its close's mark was written before
        // the read began: the slot is freed first and the mark written after (batched, up to
        // seconds later), and a read in between still shows it in progress. Its failure and its
        // end are kept until then, or it would count again as in flight (a slot lost until the
        // next read) and its failure would not count.
        let closed = &ledger.closed;
        let in_read = |group: &str, at: Instant| {
            at < began && closed.get(group).is_some_and(|c| c.at < began)
        };
        for (group, seen) in &ledger.failed {
            if seen.1.is_some_and(|at| !in_read(group, at)) {
                failed.insert(group.clone(), seen.clone());
            }
        }
        ledger
            .ended
            .retain(|group, at| !in_read(group, *at) && at.elapsed() < CLOSED_KEPT);
        ledger.failed = failed;
        ledger.closed.retain(|_, c| c.at.elapsed() < CLOSED_KEPT);
        Ok(())
    }

    pub(super) async fn admit(
        &self,
        group: &str,
        limit: usize,
        marks: &Marks<'_, impl Groups, impl Parameters>,
    ) -> Result<Admit<'_>, StepError> {
        self.reread(marks, false).await?;
        let mut ledger = self.ledger();
        let in_flight = ledger.in_flight();
        if in_flight.contains(group) {
            ledger.waiting.remove(group);
            return Ok(Admit::InFlight);
        }
        let taken = in_flight.len() + ledger.reserved.len();
        // A second request for a group already about to start waits too.
        if taken >= limit || ledger.reserved.contains(group) {
            let waiting = ledger.wait(group);
            return Ok(Admit::Full { taken, waiting });
        }
        ledger.waiting.remove(group);
        ledger.reserved.insert(group.to_owned());
        Ok(Admit::Slot(Slot {
            admission: self,
            group: group.to_owned(),
        }))
    }

    /// Just before a start, when other processes may start refreshes too: if a read of AWS's
    /// marks made now leaves no slot free, the slots taken by others than `group` and how many
    /// requests wait.
    pub(super) async fn confirm(
        &self,
        group: &str,
        limit: usize,
        marks: &Marks<'_, impl Groups, impl Parameters>,
    ) -> Result<Option<(usize, usize)>, StepError> {
        self.reread(marks, true).await?;
        let mut ledger = self.ledger();
        let taken = ledger.in_flight().iter().filter(|g| *g != group).count()
            + ledger.reserved.iter().filter(|g| *g != group).count();
        if taken < limit {
            return Ok(None);
        }
        let waiting = ledger.wait(group);
        Ok(Some((taken, waiting)))
    }

    /// A refresh of ours runs on the group (started or taken over here): it holds a slot until
    /// closed, whether or not its mark has been written yet.
    pub(super) fn started(&self, group: &str, place: MarkPlace, mark: &Mark) {
        let mut ledger = self.ledger();
        ledger.reserved.remove(group);
        ledger.closed.remove(group);
        ledger.ended.remove(group);
        ledger
            .started
            .insert(group.to_owned(), (mark.clone(), place));
    }

    /// The mark of a refresh started here that is still running, and where it is kept.
    pub(super) fn running(&self, group: &str) -> Option<(Mark, MarkPlace)> {
        self.ledger().started.get(group).cloned()
    }

    /// The group's refresh `refresh_id` has ended, wherever it was closed.
    pub(super) fn forget(&self, group: &str, refresh_id: &str) {
        let mut ledger = self.ledger();
        if ledger
            .started
            .get(group)
            .is_some_and(|(m, _)| m.refresh_id == refresh_id)
        {
            ledger.started.remove(group);
        }
    }

    /// The group's refresh has ended as `mark` says: it holds no slot from now on, and a failure
    /// counts against the stage's tolerance at once (before the slot can go to another start).
    pub(super) fn ended(&self, group: &str, mark: &Mark) {
        let mut ledger = self.ledger();
        if matches!(mark.state, MarkState::Failed | MarkState::RolledBack) {
            ledger
                .failed
                .insert(group.to_owned(), (mark.ami.clone(), Some(Instant::now())));
        }
        ledger.started.remove(group);
        ledger.ended.insert(group.to_owned(), Instant::now());
    }

    /// How many groups failed or rolled back their refresh to `ami` (AWS's marks, read at most
    /// every [`REREAD`], and the closes made here since).
    pub(super) async fn failures(
        &self,
        ami: &str,
        marks: &Marks<'_, impl Groups, impl Parameters>,
    ) -> Result<usize, StepError> {
        self.reread(marks, false).await?;
        Ok(self
            .ledger()
            .failed
            .values()
            .filter(|(a, _)| a == ami)
            .count())
    }

    /// How many groups the account has, counted at most every [`REREAD`].
    pub(super) async fn group_count(&self, groups: &impl Groups) -> Result<usize, StepError> {
        if let Some((at, n)) = self.ledger().group_count
            && at.elapsed() < REREAD
        {
            return Ok(n);
        }
        let n = groups.list().await?.len();
        self.ledger().group_count = Some((Instant::now(), n));
        Ok(n)
    }

    /// The group's refresh has ended and its mark says so.
    pub(super) fn closed(&self, group: &str, mark: &Mark, outcome: Outcome, reason: &str) {
        let mut ledger = self.ledger();
        if matches!(outcome, Outcome::Failed | Outcome::RolledBack) {
            ledger
                .failed
                .insert(group.to_owned(), (mark.ami.clone(), Some(Instant::now())));
        } else {
            ledger.failed.remove(group);
        }
        ledger.closed.insert(
            group.to_owned(),
            Closed {
                at: Instant::now(),
                mark: mark.clone(),
                outcome,
                reason: reason.to_owned(),
            },
        );
    }

    /// The outcome, if this process closed the request's refresh (its instance-refresh event
    /// came first): said again with no AWS call when the request comes back to poll.
    pub(super) fn closed_here(
        &self,
        req: &AsgRefreshRequested,
        window: &str,
    ) -> Option<StepOutput> {
        let ledger = self.ledger();
        let c = ledger.closed.get(&req.asg_name)?;
        if c.mark.ami != req.ami_id || c.mark.deadline != window {
            return None;
        }
        let mut f = AsgRefreshFinished::new(req, c.outcome, c.reason.clone());
        f.instance_refresh_id = Some(c.mark.refresh_id.clone());
        Some(StepOutput::Emit(vec![Detail::from(f)]))
    }
}

/// Deferred requests come back spread over one to three `defer` periods, so they do not all ask
/// again at the same moment; when many wait, proportionally later (up to five times), so that
/// about two per slot come back per `defer` period instead of all of them. Each return costs a
/// receive and a re-send, and hundreds of waiting requests would otherwise spend more on asking
/// again than the refreshes themselves cost.
pub(super) fn spread_defer(
    settings: &RefreshSettings,
    in_flight: usize,
    limit: usize,
    waiting: usize,
) -> StepOutput {
    let crowd = (waiting as f64 / (2.0 * limit.max(1) as f64)).clamp(1.0, MAX_CROWD);
    let mut spread = settings.clone();
    spread.defer = settings
        .defer
        .mul_f64(crowd * (1.0 + 2.0 * fastrand::f64()));
    defer(
        &spread,
        format!("{in_flight} refreshes in flight; the limit is {limit}; {waiting} requests wait"),
    )
}

/// The most a crowd of waiting requests stretches their deferral.
const MAX_CROWD: f64 = 5.0;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeAws;
    use crate::refresh::tests::settings;

    #[tokio::test]
    async fn a_slot_is_held_from_the_check_until_the_refresh_starts_or_the_request_gives_up() {
        let aws = FakeAws::default();
        let aws = Marks::new(&aws, &aws);
        let admission = Admission::default();
        let Admit::Slot(first) = admission.admit("a", 1, &aws).await.unwrap() else {
            panic!("the only slot is free");
        };
        assert!(
            matches!(
                admission.admit("b", 1, &aws).await.unwrap(),
                Admit::Full { taken: 1, .. }
            ),
            "the slot is taken before any refresh starts"
        );
        drop(first);
        assert!(matches!(
            admission.admit("b", 1, &aws).await.unwrap(),
            Admit::Slot(_)
        ));
    }

    /// A refresh's slot is freed before its close's mark is written. A read of AWS's marks made
    /// in between still shows the group in progress: the end seen here must outlive that read
    /// (or the slot stays lost until the next read, 30 s on), and so must its failure (or the
    /// stage's tolerance would not count it), until the mark written before a read says so.
    #[tokio::test]
    async fn an_end_whose_mark_is_not_written_yet_outlives_a_read_of_the_marks() {
        let aws = FakeAws::default();
        aws.template("lt-a", &["ami-0000000000000000a"], 1);
        aws.group("a", "lt-a", "1", "ami-0000000000000000a", 1);
        let mark = |state: MarkState| Mark {
            ami: "ami-0000000000000000b".into(),
            state,
            refresh_id: "ir-a".into(),
            deadline: "-".into(),
            parameter: "/golden/al2023/ami-id".into(),
        };
        let write = |m: &Mark| {
            let mut groups = aws.groups.lock().unwrap();
            let tags = &mut groups.get_mut("a").unwrap().tags;
            for (k, v) in m.tags(None) {
                tags.insert(k.into(), v);
            }
        };
        let marks = Marks::new(&aws, &aws);
        let admission = Admission::default();
        let Admit::Slot(slot) = admission.admit("a", 1, &marks).await.unwrap() else {
            panic!("the only slot is free");
        };
        let running = mark(MarkState::InProgress);
        admission.started("a", MarkPlace::Tags, &running);
        drop(slot);
        write(&running);
        // Ended rolled back; the mark in AWS still says in progress when the marks are read.
        let done = mark(MarkState::RolledBack);
        admission.ended("a", &done);
        admission.reread(&marks, true).await.unwrap();
        assert!(
            matches!(
                admission.admit("b", 1, &marks).await.unwrap(),
                Admit::Slot(_)
            ),
            "the slot a freed is free after the read"
        );
        assert_eq!(
            admission
                .failures("ami-0000000000000000b", &marks)
                .await
                .unwrap(),
            1,
            "a's failure counts after the read"
        );
        // The mark written, then read: AWS's marks say it all, and still one slot is free.
        write(&done);
        admission.closed("a", &done, Outcome::RolledBack, "rolled back");
        admission.reread(&marks, true).await.unwrap();
        assert!(matches!(
            admission.admit("c", 1, &marks).await.unwrap(),
            Admit::Slot(_)
        ));
        assert_eq!(
            admission
                .failures("ami-0000000000000000b", &marks)
                .await
                .unwrap(),
            1
        );
    }

    #[tokio::test]
    async fn the_more_requests_wait_the_later_each_comes_back() {
        let aws = FakeAws::default();
        let aws = Marks::new(&aws, &aws);
        let admission = Admission::default();
        let held = admission.admit("running", 1, &aws).await.unwrap();
        let delay_of = |waiting: usize| {
            let StepOutput::Defer { delay, .. } = spread_defer(&settings(), 1, 1, waiting) else {
                unreachable!()
            };
            delay
        };
        // A few waiting: one to three deferral periods (7 s here).
        assert!((Duration::from_secs(7)..=Duration::from_secs(21)).contains(&delay_of(2)));
        // Six per slot: three times that; a crowd: at most five times.
        assert!((Duration::from_secs(21)..=Duration::from_secs(63)).contains(&delay_of(6)));
        assert!((Duration::from_secs(35)..=Duration::from_secs(105)).contains(&delay_of(500)));
        // The ledger counts the distinct groups told to wait, and forgets one once admitted.
        for g in ["a", "b", "b", "c"] {
            admission.admit(g, 1, &aws).await.unwrap();
        }
        let Admit::Full { waiting, .. } = admission.admit("d", 1, &aws).await.unwrap() else {
            panic!("full");
        };
        assert_eq!(waiting, 4);
        drop(held);
        assert!(matches!(
            admission.admit("a", 1, &aws).await.unwrap(),
            Admit::Slot(_)
        ));
        let Admit::Full { waiting, .. } = admission.admit("a2", 0, &aws).await.unwrap() else {
            panic!("full");
        };
        assert_eq!(waiting, 4, "b, c, d and a2; a was admitted");
    }
}
