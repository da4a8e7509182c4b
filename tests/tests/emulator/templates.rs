//! DescribeLaunchTemplateVersions through the Rust SDK: explicit versions, `$Latest` and
//! `$Default`, the image-id filter, and pages the SDK follows by NextToken (moto stopped at 15).

use std::collections::BTreeSet;

use aws_sdk_ec2::types::Filter;

use crate::fixture::emulator;

#[tokio::test]
async fn describe_launch_template_versions_honours_versions_filters_and_pages() {
    let (_local, c) = emulator().await;
    let (a, b) = (c.register("img-a").await, c.register("img-b").await);
    let lt = c.template("paged", &a).await;
    // Versions 2..=20 alternate: even numbers run B, odd ones A.
    for n in 2..=20i64 {
        let ami = if n % 2 == 0 { &b } else { &a };
        assert_eq!(c.version_from(&lt, &(n - 1).to_string(), ami).await, n);
    }
    c.ec2
        .modify_launch_template()
        .launch_template_id(&lt)
        .default_version("5")
        .send()
        .await
        .unwrap();

    let numbers = |versions: &[aws_sdk_ec2::types::LaunchTemplateVersion]| -> Vec<i64> {
        versions.iter().filter_map(|v| v.version_number()).collect()
    };
    let describe = || {
        c.ec2
            .describe_launch_template_versions()
            .launch_template_id(&lt)
    };

    // Versions: numbers, $Latest, $Default.
    let picked = describe().versions("3").versions("1").send().await.unwrap();
    let mut got = numbers(picked.launch_template_versions());
    got.sort_unstable();
    assert_eq!(got, [1, 3]);
    let latest = describe().versions("$Latest").send().await.unwrap();
    assert_eq!(numbers(latest.launch_template_versions()), [20]);
    let default = describe().versions("$Default").send().await.unwrap();
    assert_eq!(numbers(default.launch_template_versions()), [5]);
    assert_eq!(
        default.launch_template_versions()[0].default_version(),
        Some(true)
    );
    let mixed = describe()
        .versions("$Latest")
        .versions("$Default")
        .versions("7")
        .send()
        .await
        .unwrap();
    let mut got = numbers(mixed.launch_template_versions());
    got.sort_unstable();
    assert_eq!(got, [5, 7, 20]);

    // The image-id filter.
    let by_image = describe()
        .filters(Filter::builder().name("image-id").values(&b).build())
        .send()
        .await
        .unwrap();
    let mut got = numbers(by_image.launch_template_versions());
    got.sort_unstable();
    assert_eq!(got, (2..=20).step_by(2).collect::<Vec<i64>>());
    assert!(
        by_image
            .launch_template_versions()
            .iter()
            .all(|v| v.launch_template_data().and_then(|d| d.image_id()) == Some(b.as_str()))
    );

    // More than 15 versions, over pages of 7: all of them, once each.
    let mut pages = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = describe()
            .max_results(7)
            .set_next_token(token.clone())
            .send()
            .await
            .unwrap();
        pages.push(numbers(page.launch_template_versions()));
        token = page.next_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
        assert!(pages.len() < 10, "paging does not end: {pages:?}");
    }
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        [7, 7, 6],
        "{pages:?}"
    );
    let all: Vec<i64> = pages.concat();
    let distinct: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(
        all.len(),
        distinct.len(),
        "duplicates across pages: {pages:?}"
    );
    assert_eq!(distinct, (1..=20).collect::<BTreeSet<i64>>());
    // Without MaxResults nothing is cut at 15 either.
    let everything = describe().send().await.unwrap();
    assert_eq!(everything.launch_template_versions().len(), 20);
    assert!(everything.next_token().is_none());
}

/// `rollout::aws::Templates::every_version`, what the resolver reads ahead with: every template's
/// `$Latest` or `$Default` version of the account, 200 a page, at most the pages it is allowed.
#[tokio::test]
async fn every_templates_latest_and_default_version_is_listed_in_pages_of_200() {
    use rollout::aws::{AwsGroups, Templates};
    let (local, c) = emulator().await;
    let (a, b) = (c.register("img-a").await, c.register("img-b").await);
    let mut made = BTreeSet::new();
    for i in 0..201 {
        let lt = c.template(&format!("listed-{i:03}"), &a).await;
        // Version 2 on B is the latest; version 1 on A stays the default.
        assert_eq!(c.version_from(&lt, "1", &b).await, 2);
        made.insert(lt);
    }
    let groups = AwsGroups::new(&local.config);
    let latest = groups.every_version("$Latest", 5).await.unwrap();
    assert_eq!(latest.len(), 201, "two pages, the second with one template");
    assert_eq!(
        latest
            .iter()
            .map(|l| l.template_id.clone())
            .collect::<BTreeSet<_>>(),
        made
    );
    assert!(latest.iter().all(|l| l.version.number == 2
        && l.version.image_id == b
        && !l.version.is_default
        && l.template_name.starts_with("listed-")));
    let default = groups.every_version("$Default", 5).await.unwrap();
    assert_eq!(default.len(), 201);
    assert!(
        default
            .iter()
            .all(|l| l.version.number == 1 && l.version.image_id == a && l.version.is_default)
    );
    // Bounded: one call is one page.
    assert_eq!(groups.every_version("$Latest", 1).await.unwrap().len(), 200);
}
