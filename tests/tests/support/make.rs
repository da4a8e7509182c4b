//! What the tests make in AWS the same way wherever they make it: shared by the e2e tests
//! (`support::make`) and the emulator tests (`tests/emulator/fixture.rs` includes this file).

/// A launch template named `name` whose version 1 runs `ami` on t3.micro; its id.
pub async fn launch_template(ec2: &aws_sdk_ec2::Client, name: &str, ami: &str) -> String {
    ec2.create_launch_template()
        .launch_template_name(name)
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id(ami)
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                .build(),
        )
        .send()
        .await
        .unwrap()
        .launch_template()
        .unwrap()
        .launch_template_id()
        .unwrap()
        .to_owned()
}
